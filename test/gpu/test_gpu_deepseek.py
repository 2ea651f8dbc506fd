"""A tiny DeepSeek-V3 (MLA, a dense first layer, shared and routed experts with e_score_correction_bias)
served by SGLang's DeepseekV3ForCausalLM through the launcher, in two mixes, against the transformers
reference: FP8-block attention + FP8 shared experts + int4 routed experts (the mix DeepSeek users ask
for), and bf16 attention + FP8 MLPs and experts.

The checks are test_gpu_serve.py's: the endpoints answer, greedy tokens equal the reference's and the
log-probs are within ``reference.logprob_tolerance``; GPU weight memory within 2% of the plan. The
reference models SGLang's two MLA paths for an FP8 ``kv_b_proj`` (``reference.MlaPaths``). The two
servers start side by side (triton attention backend, CUDA graphs off; the launcher adds
``--disable-shared-experts-fusion`` and says why). Select with ``-k deepseek``.

The tests not marked ``gpu`` run the preparation on CPU: the model, conversion and mixes, every
server command through the launcher and SGLang's own argument parser, and the reference's greedy
tokens being the same in bf16 as in fp32 (what makes demanding SGLang's tokens equal fair).
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import gpu_harness as h
from sglang_mixed_precision.serving import client

ARCH = "deepseek_v3"
MIXES = {
    "attn-fp8+shared-fp8+experts-int4": [
        ("model.layers.*.mlp.experts.*", "int4"),
        ("model.layers.*.self_attn.*", "fp8"),
        ("model.layers.*.mlp.shared_experts.*", "fp8"),
    ],
    "attn-bf16+mlp-fp8": [("model.layers.*.mlp.*", "fp8")],
}


def server_name(mix: str) -> str:
    return h.mix_server(ARCH, mix)


def prepare_deepseek(root: Path, log=h.log_to_stdout) -> Path:
    """The tiny DeepSeek-V3 (clear greedy margins), its fp16/ fp8/ int4/ conversion and a YAML per mix;
    reused when present. Returns the conversion directory."""
    import yaml

    root = Path(root).resolve()
    model, converted = root / "bf16", root / "converted"
    if not (model / "config.json").is_file():
        log(f"{ARCH}: generating the tiny model")
        h.make_model(ARCH, model, clear_margins=True)
    h.convert_once(model, converted, ("fp16", "fp8", "int4"), log)
    for mix, rules in MIXES.items():
        doc = {
            "mixed_precision": {
                "sources": {"fp16": "./fp16", "fp8": "./fp8", "int4": "./int4"},
                "default": "fp16",
                "rules": [{"match": m, "source": s} for m, s in rules],
            }
        }
        (converted / f"{mix}.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return converted


def server_specs(converted: Path, plans: Path) -> list[h.ServerSpec]:
    common = (*h.flags(h.SERVER_SETTINGS), *h.LOG_FLAGS)
    return [
        h.ServerSpec(
            server_name(mix),
            (
                "--enable-mixed-precision",
                "--mixed-precision-config",
                str(converted / f"{mix}.yaml"),
                "--model-path",
                str(converted / "fp16"),
                "--plan-dir",
                str(plans / mix),
                *common,
            ),
        )
        for mix in MIXES
    ]


@pytest.fixture(scope="module")
def deepseek_work(workdir, progress) -> Path:
    return prepare_deepseek(workdir / ARCH, log=progress)


@pytest.fixture(scope="module")
def deepseek_fleet(request, deepseek_work, recorder, ports, progress):
    from sglang_mixed_precision.serving.launcher import check_plugin_installed

    check_plugin_installed()
    specs = server_specs(deepseek_work, deepseek_work.parent / "plans")
    fleet = h.fleet_from_options(specs, request, recorder, ports, progress)
    others = recorder.servers  # a callable: the session fleet's summary, when it runs
    recorder.servers = lambda: [*others(), *fleet.summary()]
    with fleet:
        yield fleet


@pytest.fixture(scope="module")
def deepseek_generated(deepseek_fleet, deepseek_work):
    cache: dict[str, list[h.Generation]] = {}

    def get(mix: str) -> list[h.Generation]:
        if mix not in cache:
            prompts = h.prompt_ids(deepseek_work / "fp16")
            cache[mix] = h.generate_each(deepseek_fleet.server(server_name(mix)).url, prompts)
        return cache[mix]

    return get


CASES = [pytest.param(mix, id=server_name(mix)) for mix in MIXES]


@pytest.mark.gpu
@pytest.mark.parametrize("mix", CASES)
def test_deepseek_endpoints_answer(mix, deepseek_fleet, deepseek_generated, record):
    server = deepseek_fleet.server(server_name(mix))
    record["ready_s"] = server.ready_s
    outputs = deepseek_generated(mix)
    assert [len(g.output_ids) for g in outputs] == [h.MAX_NEW_TOKENS] * len(h.PROMPTS)
    model = client.get_json(f"{server.url}/v1/models")["data"][0]["id"]
    chat = client.post_json(
        f"{server.url}/v1/chat/completions",
        {"model": model, "temperature": 0, "max_tokens": 8, "messages": [{"role": "user", "content": "Hello."}]},
    )
    assert isinstance(chat["choices"][0]["message"]["content"], str), chat
    assert "adding --disable-shared-experts-fusion" in server.log_text()  # the launcher's line


@pytest.mark.gpu
@pytest.mark.parametrize("mix", CASES)
def test_deepseek_matches_reference(mix, deepseek_generated, deepseek_work, record):
    outputs = deepseek_generated(mix)
    h.check_against_reference(deepseek_work / f"{mix}.yaml", outputs, record)


@pytest.mark.gpu
@pytest.mark.parametrize("mix", CASES)
def test_deepseek_weight_memory_matches_plan(mix, deepseek_fleet, deepseek_work, record):
    server = deepseek_fleet.server(server_name(mix))
    facts = client.parse_server_log(server.log_text())
    planned = h.plan_rank_bytes(deepseek_work / f"{mix}.yaml")
    record.update(layers=facts.get("layers"), plan_bytes=planned, audit=facts.get("audit"))
    assert "param_bytes" in facts, f"the mixed loader's weight-memory line is not in {server.log_path}"
    delta = (facts["param_bytes"] - planned) / planned
    record.update(param_bytes=facts["param_bytes"], weight_vs_plan=round(delta, 5))
    assert abs(delta) <= h.MEMORY_TOLERANCE


# ---- on CPU: everything before SGLang starts ----------------------------------------------------------------
def test_deepseek_commands_pass_the_launcher_and_sglangs_parser(deepseek_work):
    for i, spec in enumerate(server_specs(deepseek_work, deepseek_work.parent / "plans")):
        out = io.StringIO()
        command = spec.sglang_command(31000 + 2 * i, 31001 + 2 * i, out=out)
        assert command[1:3] == ["-m", "sglang.launch_server"], command
        assert (
            command[-1] == "--disable-shared-experts-fusion"
            and "adding --disable-shared-experts-fusion" in out.getvalue()
        )
        assert client.sglang_argv_problem(command[3:]) is None
        plan_dir = Path(command[command.index("--model-path") + 1])
        assert (plan_dir / "config.json").is_file() and "attention-backend" in " ".join(command)


@pytest.mark.parametrize("mix", CASES)
def test_deepseek_reference_picks_the_same_tokens_in_bf16_and_fp32(mix, deepseek_work):
    reference = h.MixReference(deepseek_work / f"{mix}.yaml", device="cpu")
    for prompt in h.prompt_ids(deepseek_work / "fp16"):
        fp32, bf16 = reference.greedy(prompt, h.MAX_NEW_TOKENS)
        assert fp32 == bf16
