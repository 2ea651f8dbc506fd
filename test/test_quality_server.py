"""The SGLang backend's request and response layer, on answers shaped like SGLang 0.5.17's.

The answers here are built by hand (no server runs): they test the parsing only. That the numbers
a real server returns agree with the reference path is checked on the GPU (bench/gpu_quality_proof.py).
"""

import math

import numpy as np
import pytest

from sglang_mixed_precision.core.errors import ErrorCode, MixedPrecisionError
from sglang_mixed_precision.quality.metrics import compare
from sglang_mixed_precision.quality.server import logprob_request, parse_scores, union_ids

IDS = [5, 1, 2, 0]
# three predicted positions over a vocabulary of 3 tokens; full log-probs of the two models
BASE = np.log([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.7, 0.2, 0.1]])
MIX = np.log([[0.5, 0.3, 0.2], [0.3, 0.4, 0.3], [0.6, 0.3, 0.1]])


def answer(lp, top_k=0, token_ids=None):
    """meta_info as SGLang returns it: entry i predicts token i, entry 0 has no log-prob."""
    meta = {
        "input_token_logprobs": [[None, IDS[0], None]]
        + [[float(lp[i - 1, IDS[i]]), IDS[i], None] for i in range(1, len(IDS))],
        "input_top_logprobs": [None]
        + [
            [[float(lp[i - 1, t]), int(t), None] for t in np.argsort(-lp[i - 1])[: max(1, top_k)]]
            for i in range(1, len(IDS))
        ],
    }
    if token_ids is not None:
        meta["input_token_ids_logprobs"] = [None] + [
            [[float(lp[i - 1, t]), t, None] for t in token_ids] for i in range(1, len(IDS))
        ]
    return {"text": "x", "meta_info": meta}


def test_request_asks_for_input_logprobs_from_the_first_token():
    body = logprob_request(IDS, top_k=20)
    assert body["input_ids"] == IDS and body["return_logprob"] and body["logprob_start_len"] == 0
    assert body["top_logprobs_num"] == 20 and "token_ids_logprob" not in body
    assert logprob_request(IDS, token_ids=[3, 1])["token_ids_logprob"] == [3, 1]


def test_baseline_and_mix_scores_give_the_hand_computed_kld():
    base = parse_scores(answer(BASE, top_k=2), IDS, 2)
    assert base.top_ids.tolist() == [[0, 1], [1, 2], [0, 1]]
    assert base.target_logprobs == pytest.approx([math.log(0.3), math.log(0.3), math.log(0.7)])
    wanted = union_ids(base.top_ids)
    assert wanted == [0, 1, 2]
    mix = parse_scores(answer(MIX, token_ids=wanted), IDS, 2, base.top_ids)
    c = compare(base, mix)
    # position 0: {0.6, 0.3 | 0.1} vs {0.5, 0.3 | 0.2}
    k0 = 0.6 * math.log(0.6 / 0.5) + 0.1 * math.log(0.1 / 0.2)
    k1 = 0.5 * math.log(0.5 / 0.4) + 0.3 * math.log(1.0) + 0.2 * math.log(0.2 / 0.3)
    k2 = 0.7 * math.log(0.7 / 0.6) + 0.2 * math.log(0.2 / 0.3) + 0.1 * math.log(1.0)
    assert c.kld == pytest.approx([k0, k1, k2])
    assert c.top1 == pytest.approx(1.0)  # argmax 0, 1, 0 for both
    assert c.k == 2


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda a: a["meta_info"].pop("input_top_logprobs"), "input_top_logprobs should have"),
        (lambda a: a["meta_info"]["input_token_logprobs"].pop(), "one entry per input token"),
        (lambda a: a["meta_info"]["input_token_logprobs"][2].__setitem__(1, 9), "scores token 9"),
        (lambda a: a["meta_info"]["input_top_logprobs"].__setitem__(1, None), "expected a list"),
        (lambda a: a.pop("meta_info"), "no meta_info"),
    ],
)
def test_malformed_answers_are_named(damage, message):
    a = answer(BASE, top_k=2)
    damage(a)
    with pytest.raises(MixedPrecisionError, match=message) as e:
        parse_scores(a, IDS, 2)
    assert e.value.code is ErrorCode.QUALITY_BAD_RESPONSE


def test_a_mix_answer_lacking_an_asked_token_is_refused():
    base = parse_scores(answer(BASE, top_k=2), IDS, 2)
    with pytest.raises(MixedPrecisionError, match="lacks token"):
        parse_scores(answer(MIX, token_ids=[0, 1]), IDS, 2, base.top_ids)
    with pytest.raises(MixedPrecisionError, match="fewer than the 3"):
        parse_scores(answer(BASE, top_k=2), IDS, 3)


def test_scoring_server_command_passes_the_launcher_and_sglangs_parser(moe_sources, tmp_path):
    """The launcher validates the mix and writes the plan directory; SGLang's own argument parser
    accepts the command it would start (no server starts here)."""
    import io

    from sglang_mixed_precision.core.autoplan import mix_yaml
    from sglang_mixed_precision.core.config import parse_config
    from sglang_mixed_precision.quality.server import server_argv
    from sglang_mixed_precision.serving import client, launcher

    config = tmp_path / "mix.yaml"
    sources = "\n".join(f"    {k}: {v}" for k, v in moe_sources.items())
    config.write_text(f"mixed_precision:\n  sources:\n{sources}\n  default: int4\n")
    config.write_text(mix_yaml(parse_config(config.read_text(), config), {}, "fp8"))
    cmd = launcher.sglang_command(server_argv(config, tmp_path / "plan", 30001, 30002), out=io.StringIO())
    assert (tmp_path / "plan" / "config.json").is_file()
    args = cmd[cmd.index("sglang.launch_server") + 1 :]
    assert client.sglang_argv_problem(args) is None
    assert "--disable-radix-cache" in args and args[args.index("--port") + 1] == "30001"


class _Recording:
    """ServerBackend's decisions without processes: what it would start and what it would reload."""

    def __init__(self, workdir):
        from sglang_mixed_precision.quality.server import ServerBackend

        outer = self
        self.started, self.reloaded = [], []

        class Backend(ServerBackend):
            def start(self, config, plan):
                from sglang_mixed_precision.quality.server import RunningServer

                outer.started.append(config.name)
                server = RunningServer(config, plan, None, "http://stand-in", config)
                self.servers.append(server)
                return server

            def reload(self, server, config, plan):
                outer.reloaded.append(config.name)
                server.config, server.plan = config, plan

        self.backend = Backend(workdir, log=lambda m: None)


def test_a_mix_of_the_same_schemes_reloads_a_running_server_in_place(moe_sources, tmp_path):
    """fp8 attention from a second release (same scheme, other files) reloads the fp8 server in
    place; a scheme change needs a server of its own; a mix already served is reused as it is."""
    import shutil

    from sglang_mixed_precision.core.config import load_config
    from sglang_mixed_precision.core.plan import build_plan

    other = tmp_path / "fp8b"
    shutil.copytree(moe_sources["fp8"], other)
    sources = {**moe_sources, "fp8b": other}
    lines = "\n".join(f"    {k}: {v}" for k, v in sources.items())

    def mix(name, attention):
        # attention only: fp8 block linears take new bytes in place, fused fp8 experts do not
        path = tmp_path / f"{name}.yaml"
        rule = f'  rules:\n    - {{match: "model.layers.*.self_attn.*", source: {attention}}}\n'
        path.write_text(f"mixed_precision:\n  sources:\n{lines}\n  default: fp16\n{rule}")
        return build_plan(load_config(path))

    rec = _Recording(tmp_path / "servers")
    for name, attention in [("a-fp8", "fp8"), ("b-fp8b", "fp8b"), ("c-int4", "int4"), ("d-fp8b", "fp8b")]:
        rec.backend.server_for(mix(name, attention))
    assert rec.started == ["a-fp8.yaml", "c-int4.yaml"]
    assert rec.reloaded == ["b-fp8b.yaml"]  # d-fp8b: the reloaded server already serves it
