"""The converter end to end on tiny models: formats, configs, skip, errors, resume, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from sglang_mixed_precision.cli import main as cli_main
from sglang_mixed_precision.convert import writer as writer_mod
from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert
from sglang_mixed_precision.core.errors import MixedPrecisionError, ValidationErrors
from sglang_mixed_precision.core.formats.fp8 import dequant_block as dequant_fp8_block
from sglang_mixed_precision.core.naming import classify


def read_all(d: Path) -> dict[str, torch.Tensor]:
    idx = d / "model.safetensors.index.json"
    if idx.exists():
        index = json.loads(idx.read_text())["weight_map"]
        files = sorted(set(index.values()))
    else:  # a single-file input model
        files = [p.name for p in d.glob("*.safetensors")]
    out = {}
    for f in files:
        with safe_open(str(d / f), "pt") as h:
            for k in h.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                out[k] = h.get_tensor(k)
    if idx.exists():
        assert set(out) == set(index), "index and shards disagree"
    return out


def qconfig(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())["quantization_config"]


def opts(model, out, **kw) -> ConvertOptions:
    kw.setdefault("method", "rtn")
    return ConvertOptions(str(model), str(out), progress=False, **kw)


@pytest.fixture(scope="module")
def moe_rtn(tiny_qwen3_moe, tmp_path_factory):
    out = tmp_path_factory.mktemp("moe_rtn")
    report = convert(opts(tiny_qwen3_moe, out, max_shard_size="3MB"))
    return tiny_qwen3_moe, out, report


# -- formats ------------------------------------------------------------------------------------
def test_every_output_is_a_complete_model_dir(moe_rtn):
    src, out, _ = moe_rtn
    for fmt in ("fp16", "fp8", "int4"):
        d = out / fmt
        for f in ("config.json", "generation_config.json", "tokenizer.json", "model.safetensors.index.json"):
            assert (d / f).exists(), f"{fmt}/{f}"
    assert len(json.loads((out / "fp8/model.safetensors.index.json").read_text())["weight_map"]) > 0
    assert len({*json.loads((out / "int4/model.safetensors.index.json").read_text())["weight_map"].values()}) > 1


def test_fp8_layout_and_config(moe_rtn):
    src, out, _ = moe_rtn
    qc = qconfig(out / "fp8")
    assert qc["quant_method"] == "fp8" and qc["fmt"] == "e4m3" and qc["activation_scheme"] == "dynamic"
    assert qc["weight_block_size"] == [128, 128]
    assert {"lm_head", "model.embed_tokens", "model.layers.0.mlp.gate", "model.norm"} <= set(
        qc["modules_to_not_convert"]
    )
    t = read_all(out / "fp8")
    orig = read_all(src)
    w, s = (
        t["model.layers.1.mlp.experts.3.down_proj.weight"],
        t["model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"],
    )
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (4, 2)
    assert (
        dequant_fp8_block(w, s) - orig["model.layers.1.mlp.experts.3.down_proj.weight"].float()
    ).norm() < 0.04 * orig["model.layers.1.mlp.experts.3.down_proj.weight"].float().norm()
    for name in ("model.layers.0.mlp.gate.weight", "lm_head.weight", "model.embed_tokens.weight"):
        assert torch.equal(t[name], orig[name]), name  # 16-bit, untouched


def test_int4_layout_and_config(moe_rtn):
    src, out, _ = moe_rtn
    qc = qconfig(out / "int4")
    assert qc["quant_method"] == "gptq" and qc["bits"] == 4 and qc["group_size"] == 128 and qc["sym"] is True
    assert qc["desc_act"] is False and qc["checkpoint_format"] == "gptq" and qc["lm_head"] is False
    for fmt in ("fp8", "int4"):  # the model's dtype: what the GPU proof served
        assert json.loads((out / fmt / "config.json").read_text())["dtype"] == "bfloat16"
    t = read_all(out / "int4")
    m = "model.layers.0.self_attn.k_proj"
    assert t[f"{m}.qweight"].shape == (64, 256) and t[f"{m}.qweight"].dtype == torch.int32
    assert t[f"{m}.qzeros"].shape == (4, 32) and (t[f"{m}.qzeros"] == 0x77777777).all()
    assert t[f"{m}.scales"].shape == (4, 256) and t[f"{m}.scales"].dtype == torch.float16
    assert torch.equal(t[f"{m}.g_idx"], torch.arange(512, dtype=torch.int32) // 128)
    assert f"{m}.weight" not in t
    orig = read_all(src)
    for name, tensor in orig.items():
        module = name.rsplit(".", 1)[0]
        if not classify(module).role.quantizable:
            assert torch.equal(t[name], tensor), name  # router, norms, embeddings, lm_head stay 16-bit


def test_fp16_is_the_original_bytes(moe_rtn):
    src, out, _ = moe_rtn
    for f in json.loads((out / "fp16/model.safetensors.index.json").read_text())["weight_map"].values():
        assert (out / "fp16" / f).read_bytes() == (src / f).read_bytes()
    assert "quantization_config" not in json.loads((out / "fp16/config.json").read_text())


def test_reload_check_measures_every_module(moe_rtn):
    src, out, report = moe_rtn
    n_quantizable = sum(1 for n in read_all(src) if classify(n.rsplit(".", 1)[0]).role.quantizable)
    for fmt, limit in (("fp8", 0.04), ("int4", 0.13)):
        c = report.checks[fmt]
        assert not c.problems
        assert len(c.errors) == n_quantizable
        assert 0 < max(c.errors.values()) < limit


def test_sglang_parses_the_written_quantization_configs(moe_rtn):
    from sglang.srt.layers.quantization.fp8 import Fp8Config
    from sglang.srt.layers.quantization.gptq import GPTQMarlinConfig
    from sglang.srt.layers.quantization.utils import is_layer_skipped

    _, out, _ = moe_rtn
    fp8 = Fp8Config.from_config(qconfig(out / "fp8"))
    assert fp8.weight_block_size == [128, 128]
    assert is_layer_skipped("model.layers.0.mlp.gate", fp8.ignored_layers)
    assert not is_layer_skipped("model.layers.0.self_attn.qkv_proj", fp8.ignored_layers)
    assert not is_layer_skipped("model.layers.0.mlp.experts", fp8.ignored_layers)
    gptq = GPTQMarlinConfig.from_config(qconfig(out / "int4"))
    assert gptq.group_size == 128 and gptq.desc_act is False and gptq.lm_head_quantized is False


# -- GPTQ ---------------------------------------------------------------------------------------
def test_gptq_conversion_beats_rtn_and_routes_experts(tiny_qwen3_moe, tmp_path):
    report = convert(
        opts(
            tiny_qwen3_moe,
            tmp_path / "o",
            method="gptq",
            formats=("int4",),
            nsamples=8,
            seqlen=128,
            min_expert_tokens=16,
        )
    )
    m = report.int4_method
    assert m["method"] == "gptq" and m["calibration_sequences"] == 8
    assert m["heldout_gptq_error"] < m["heldout_rtn_error"]
    # every calibration token is routed to exactly top_k=2 experts of each layer
    tokens = m["calibration_sequences"] * m["seqlen"]
    for layer in (0, 1):
        per_expert = [m["expert_tokens"][f"model.layers.{layer}.mlp.experts.{e}.gate_proj"] for e in range(8)]
        assert sum(per_expert) == 2 * tokens
        assert len(set(per_expert)) > 1  # the router, not a uniform split, decided
    fallback = {k for k, v in m["expert_tokens"].items() if v < 16}
    assert set(m["rtn_fallback"]) == fallback
    assert not report.checks["int4"].problems


def test_gptq_router_matches_transformers_topk(tiny_qwen3_moe):
    from transformers import AutoConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    from sglang_mixed_precision.convert.calibration import GptqInt4

    cfg = AutoConfig.from_pretrained(str(tiny_qwen3_moe))
    router = Qwen3MoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight)
    x = torch.randn(300, cfg.hidden_size)
    _, _, expected = router(x)
    g = GptqInt4.__new__(GptqInt4)
    g.top_k = cfg.num_experts_per_tok
    got = g.route(x, router.weight.detach())
    assert torch.equal(got.sort(dim=-1).values, expected.sort(dim=-1).values)


def test_gptq_all_experts_fall_back_when_threshold_is_high(tiny_qwen3_moe, tmp_path):
    report = convert(
        opts(
            tiny_qwen3_moe,
            tmp_path / "o",
            method="gptq",
            formats=("int4",),
            nsamples=2,
            seqlen=64,
            min_expert_tokens=10_000,
            check=False,
        )
    )
    expert_modules = [k for k in report.int4_method["expert_tokens"]]
    assert len(expert_modules) == 2 * 8 * 3
    assert set(report.int4_method["rtn_fallback"]) >= set(expert_modules)


def test_gptq_desc_act_writes_a_permuted_g_idx(tiny_qwen3, tmp_path):
    report = convert(
        opts(tiny_qwen3, tmp_path / "o", method="gptq", formats=("int4",), nsamples=4, seqlen=128, desc_act=True)
    )
    assert qconfig(tmp_path / "o/int4")["desc_act"] is True
    t = read_all(tmp_path / "o/int4")
    g = t["model.layers.0.mlp.down_proj.g_idx"]
    assert not torch.equal(g, torch.arange(g.numel(), dtype=torch.int32) // 128)
    assert torch.equal(torch.bincount(g.long()), torch.full((g.numel() // 128,), 128))
    assert max(report.checks["int4"].errors.values()) < 0.3


# -- skip / config --------------------------------------------------------------------------------
def test_skip_leaves_the_whole_fused_group_16bit(tiny_qwen3, tmp_path):
    convert(opts(tiny_qwen3, tmp_path / "o", skip=["model.layers.0.self_attn.q_proj"], check=False))
    fp8, int4, orig = read_all(tmp_path / "o/fp8"), read_all(tmp_path / "o/int4"), read_all(tiny_qwen3)
    for p in ("q_proj", "k_proj", "v_proj"):  # k/v follow q: SGLang fuses them into qkv_proj
        name = f"model.layers.0.self_attn.{p}.weight"
        assert torch.equal(fp8[name], orig[name]) and torch.equal(int4[name], orig[name])
        assert f"model.layers.1.self_attn.{p}.qweight" in int4
    assert "model.layers.0.self_attn.q_proj" in qconfig(tmp_path / "o/fp8")["modules_to_not_convert"]
    assert r"-:model\.layers\.0\.self_attn\.qkv_proj$" in qconfig(tmp_path / "o/int4")["dynamic"]


def test_cli_writes_mixed_config(tiny_qwen3_moe, tmp_path, capsys):
    rc = cli_main(
        [
            "convert",
            "--model_path",
            str(tiny_qwen3_moe),
            "--output_dir",
            str(tmp_path / "o"),
            "--method",
            "rtn",
            "--create_config",
            "--attention_precision",
            "fp8",
            "--no_progress",
            "--verify",
        ]
    )
    assert rc == 0
    doc = yaml.safe_load((tmp_path / "o/mixed_precision_config.yaml").read_text())["mixed_precision"]
    assert doc["default"] == "fp16" and doc["sources"] == {"fp16": "./fp16", "fp8": "./fp8", "int4": "./int4"}
    rules = {r["match"]: r["source"] for r in doc["rules"]}
    assert rules["model.layers.*.mlp.experts.*"] == "int4"
    assert rules["model.layers.*.self_attn.*"] == "fp8"
    assert "max relative weight error" in capsys.readouterr().out


# -- errors ---------------------------------------------------------------------------------------
def test_not_a_model_dir(tmp_path):
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(tmp_path, tmp_path / "o"))
    assert e.value.code == "not_a_model_dir"


def _copy_model(src: Path, dst: Path, **config_changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config_changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_unsupported_architecture(tiny_qwen3, tmp_path):
    m = _copy_model(tiny_qwen3, tmp_path / "m", architectures=["FancyNewForCausalLM"])
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(m, tmp_path / "o"))
    assert e.value.code == "unsupported_architecture" and "FancyNewForCausalLM" in str(e.value)


def test_already_quantized_input(moe_rtn, tmp_path):
    _, out, _ = moe_rtn
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(out / "fp8", tmp_path / "o"))
    assert e.value.code == "already_quantized"
    m = _copy_model(out / "int4", tmp_path / "m")
    cfg = json.loads((m / "config.json").read_text())
    del cfg["quantization_config"]
    (m / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MixedPrecisionError) as e:  # caught from the tensors alone
        convert(opts(m, tmp_path / "o2"))
    assert e.value.code == "already_quantized"
    assert "qweight" in str(e.value) or "qzeros" in str(e.value) or "I32" in str(e.value)


def test_shape_not_divisible_names_tensor_and_fix(tmp_path):
    from sglang_mixed_precision.testing.tinymodels import make_tiny_model

    m = make_tiny_model("qwen3", tmp_path / "m", num_layers=1, intermediate_size=200)
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(m, tmp_path / "o"))
    assert e.value.code == "shape_not_divisible"
    assert "model.layers.0.mlp.down_proj.weight" in str(e.value) and "--group_size" in str(e.value)
    assert not (tmp_path / "o" / "int4").exists()  # nothing written before the checks pass
    convert(opts(m, tmp_path / "o", skip=["model.layers.0.mlp.down_proj"], check=False))  # the suggested fix works


def test_output_dir_not_empty_and_overwrite(moe_rtn, tiny_qwen3, tmp_path):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # a file the converter did not write: refused, --overwrite included
        with pytest.raises(MixedPrecisionError) as e:
            convert(opts(tiny_qwen3, tmp_path / "o", overwrite=overwrite))
        assert e.value.code == "output_not_empty" and "notes.txt" in str(e.value)
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["notes.txt"]
    convert(opts(tiny_qwen3, tmp_path / "c", check=False))
    with pytest.raises(MixedPrecisionError) as e:  # a different conversion in the same dir
        convert(opts(tiny_qwen3, tmp_path / "c", group_size=64))
    assert e.value.code == "output_not_empty" and "group_size" in str(e.value)
    convert(opts(tiny_qwen3, tmp_path / "c", group_size=64, overwrite=True, check=False))
    assert qconfig(tmp_path / "c" / "int4")["group_size"] == 64


@pytest.mark.parametrize(
    "change,code,says",
    [
        ({"formats": ("fp4",)}, "bad_format", "fp4"),
        ({"group_size": 96}, "bad_group_size", "group_size 96"),
        ({"method": "awq", "formats": ("int4",)}, "bad_method", "'awq'"),
        ({"method": "gptq", "calib_file": "/no/such/calib.txt"}, "calib_file_missing", "calibration file not found"),
    ],
)
def test_bad_options_are_refused(tiny_qwen3, tmp_path, change, code, says):
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(tiny_qwen3, tmp_path / "o", **change))
    assert e.value.code == code and says in str(e.value)


def test_calibration_text_too_short(tiny_qwen3, tmp_path):
    (tmp_path / "calib.txt").write_text("a few words")
    with pytest.raises(MixedPrecisionError) as e:
        convert(
            opts(tiny_qwen3, tmp_path / "o", method="gptq", formats=("int4",), calib_file=str(tmp_path / "calib.txt"))
        )
    assert e.value.code == "calib_too_short" and "tokens" in str(e.value)


def test_output_path_is_a_file(tiny_qwen3, tmp_path):
    (tmp_path / "o").write_text("")
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(tiny_qwen3, tmp_path / "o"))
    assert e.value.code == "output_not_dir" and "not a directory" in str(e.value)


def test_missing_input_shard_is_named(tiny_llama, tmp_path):
    m = _copy_model(tiny_llama, tmp_path / "m")
    shard = sorted(m.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(m, tmp_path / "o"))
    assert e.value.code == "missing_file" and shard.name in str(e.value)


def test_verify_fails_above_the_error_bound(tiny_qwen3, tmp_path):
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(tiny_qwen3, tmp_path / "o", formats=("int4",), verify=True, max_error_int4=1e-6))
    assert e.value.code == "verify_failed" and "relative error" in str(e.value) and "> 1e-06" in str(e.value)


def test_config_precision_needs_its_output():
    from sglang_mixed_precision.commands.convert import mixed_config_yaml

    with pytest.raises(MixedPrecisionError) as e:
        mixed_config_yaml("fp16", "fp8", "int4", ("fp16", "fp8"))
    assert e.value.code == "bad_precision" and "--expert_precision int4 but int4/ is not being written" in str(e.value)


def test_several_problems_reported_together(tmp_path):
    from sglang_mixed_precision.testing.tinymodels import make_tiny_model

    m = make_tiny_model("qwen3", tmp_path / "m", num_layers=2, intermediate_size=200)
    with pytest.raises(ValidationErrors) as e:
        convert(opts(m, tmp_path / "o"))
    assert len(e.value.errors) == 2 and set(e.value.codes) == {"shape_not_divisible"}


# -- resume ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_resume_after_interruption_keeps_finished_shards(tiny_qwen3_moe, tmp_path, monkeypatch, method):
    kw = dict(method=method, max_shard_size="2MB", check=False, nsamples=2, seqlen=128)
    clean = tmp_path / "clean"
    convert(opts(tiny_qwen3_moe, clean, **kw))

    real_add = writer_mod.ShardedWriter.add

    def flaky_add(self, name, t):
        # stop when int4 reaches layer 1, just after a shard boundary: layer 0 is finished everywhere
        if self.out_dir.name == "int4" and name.startswith("model.layers.1."):
            self.close_shard()
            raise KeyboardInterrupt("simulated interruption")
        return real_add(self, name, t)

    out = tmp_path / "resumed"
    monkeypatch.setattr(writer_mod.ShardedWriter, "add", flaky_add)
    with pytest.raises(KeyboardInterrupt):
        convert(opts(tiny_qwen3_moe, out, **kw))
    monkeypatch.setattr(writer_mod.ShardedWriter, "add", real_add)
    finished = {(d, p.name): p.stat().st_ino for d in ("fp8", "int4") for p in (out / d).glob("part-*.safetensors")}
    assert finished, "some shards should have been finished before the interruption"

    from sglang_mixed_precision.convert.calibration import GptqInt4

    replayed = []
    real_skip = GptqInt4.skip_unit
    monkeypatch.setattr(
        GptqInt4, "skip_unit", lambda self, unit, *a: (replayed.append(unit.layer), real_skip(self, unit, *a))
    )
    report = convert(opts(tiny_qwen3_moe, out, **kw))
    assert sum(report.resumed_shards.values()) == len(finished)
    if method == "gptq":  # finished layers are replayed from the written int4 weights, not re-quantized
        assert replayed == [None, 0]
    for (d, name), inode in finished.items():  # the same files, renamed in place, not rewritten
        i = int(name.split("-")[1].split(".")[0])
        (final,) = (out / d).glob(f"model-{i:05d}-of-*.safetensors")
        assert final.stat().st_ino == inode
    for fmt in ("fp8", "int4"):
        a, b = read_all(clean / fmt), read_all(out / fmt)
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"{fmt}:{k}"
        assert not list((out / fmt).glob("*.body"))
    state = json.loads((out / "int4" / ".convert_state.json").read_text())
    assert state["complete"]


# -- error paths of the converter's plan and calibration ----------------------------------------
def test_tensors_the_converter_cannot_quantize_are_named_before_writing(tiny_qwen3, tmp_path):
    """A 3-D linear weight and a fused 3-D expert tensor: both reported at once, nothing written."""
    from ckpt_writers import rewrite_checkpoint

    def edit(state):
        state["model.layers.0.mlp.down_proj.weight"] = state["model.layers.0.mlp.down_proj.weight"].view(4, 128, 1024)
        state["model.layers.1.mlp.experts.gate_up_proj"] = torch.zeros(2, 8, 4, dtype=torch.bfloat16)

    m = rewrite_checkpoint(tiny_qwen3, tmp_path / "m", edit)
    with pytest.raises(ValidationErrors) as e:
        convert(opts(m, tmp_path / "o"))
    assert e.value.codes == ["unsupported_tensor", "unsupported_tensor"]
    by_detail = {x.detail: x for x in e.value.errors}
    linear = by_detail["model.layers.0.mlp.down_proj.weight is a 3-D linear weight [4, 128, 1024]"]
    assert linear.where == f"{m / 'model.safetensors'}:model.layers.0.mlp.down_proj.weight"
    assert "one 2-D weight per expert/projection" in linear.fix
    fused = by_detail[
        "model.layers.1.mlp.experts.gate_up_proj: fused expert tensor the converter does not know how to split"
    ]
    assert fused.where.endswith("model.safetensors:model.layers.1.mlp.experts.gate_up_proj")
    assert "per-expert gate_proj/up_proj/down_proj" in fused.fix
    assert not (tmp_path / "o").exists()


def _without_tokenizer(src: Path, dst: Path) -> Path:
    """``src`` linked file by file into ``dst``, minus its tokenizer files."""
    dst.mkdir()
    for f in src.iterdir():
        if not f.name.startswith("tokenizer") and f.name != "chat_template.jinja":
            (dst / f.name).symlink_to(f)
    return dst


@pytest.mark.parametrize(
    "damage,says",
    [
        # transformers builds an empty tokenizer for a directory without tokenizer files: that must not read as
        # "calibration text too short"
        ("missing", "turns the calibration text into no tokens: the model directory has no usable tokenizer files"),
        ("corrupt", "cannot load the model's tokenizer: Expecting value"),
    ],
    ids=["missing", "corrupt"],
)
def test_gptq_without_a_usable_tokenizer(tiny_qwen3, tmp_path, damage, says):
    m = _without_tokenizer(tiny_qwen3, tmp_path / "m")
    if damage == "corrupt":
        (m / "tokenizer_config.json").symlink_to(tiny_qwen3 / "tokenizer_config.json")
        (m / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(MixedPrecisionError) as e:
        convert(opts(m, tmp_path / "o", method="gptq", formats=("int4",)))
    assert e.value.code == "no_tokenizer" and says in e.value.detail
    assert e.value.where == str(m)
    assert e.value.fix == "add the tokenizer files to the model directory, or use --method rtn"


def _layer0(model_dir: Path) -> dict[str, torch.Tensor]:
    from ckpt_writers import load_state

    return {k: v for k, v in load_state(model_dir).items() if k.startswith("model.layers.0.")}


def test_calibration_refuses_a_tensor_its_transformers_layer_has_no_place_for(tiny_qwen3):
    """A q_proj bias in a model whose config says attention_bias: false."""
    from sglang_mixed_precision.convert.calibration import LayerFactory

    tensors = _layer0(tiny_qwen3)
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(512, dtype=torch.bfloat16)
    with pytest.raises(MixedPrecisionError) as e:
        LayerFactory(tiny_qwen3).build(0, tensors, "model.layers.0.")
    assert e.value.code == "unsupported_architecture"
    assert e.value.detail == "tensor model.layers.0.self_attn.q_proj.bias has no place in Qwen3DecoderLayer"
    assert e.value.where == "model.layers.0.self_attn.q_proj.bias" and "--method rtn" in e.value.fix


def test_calibration_names_layer_tensors_missing_from_the_checkpoint(tiny_qwen3):
    from sglang_mixed_precision.convert.calibration import LayerFactory

    tensors = _layer0(tiny_qwen3)
    del tensors["model.layers.0.self_attn.q_norm.weight"]
    with pytest.raises(MixedPrecisionError) as e:
        LayerFactory(tiny_qwen3).build(0, tensors, "model.layers.0.")
    assert e.value.code == "unsupported_architecture"
    assert e.value.detail == "layer tensors missing from the checkpoint: ['self_attn.q_norm.weight']"
    assert e.value.where == "model.layers.0." and "--method rtn" in e.value.fix


def test_calibration_needs_transformers_layer_classes():
    """Guard for a transformers module without the classes calibration builds (no supported architecture lacks them)."""
    import types

    from sglang_mixed_precision.convert.calibration import LayerFactory

    module = types.ModuleType("transformers.models.fancy.modeling_fancy")
    module.FancyRotaryEmbedding = type("FancyRotaryEmbedding", (), {})
    with pytest.raises(MixedPrecisionError) as e:
        LayerFactory._find(module, "DecoderLayer")
    assert e.value.code == "unsupported_architecture"
    assert e.value.detail == "transformers.models.fancy.modeling_fancy has no *DecoderLayer class"
    assert "--method rtn" in e.value.fix
    assert LayerFactory._find(module, "RotaryEmbedding") is module.FancyRotaryEmbedding


def test_calibration_model_structure_errors(tmp_path):
    """No embedding outside the layers; a linear with no known data-flow stage; experts without a router."""
    from types import SimpleNamespace

    from sglang_mixed_precision.convert.calibration import GptqInt4

    g = GptqInt4.__new__(GptqInt4)  # the steps below read no calibration data
    g.model = SimpleNamespace(path=tmp_path / "m")
    with pytest.raises(MixedPrecisionError) as e:
        g._embed({"model.norm.weight": torch.ones(4), "lm_head.weight": torch.ones(8, 4)})
    assert (
        e.value.code == "unsupported_architecture" and e.value.detail == "no token embedding found outside the layers"
    )
    assert e.value.where == str(tmp_path / "m") and "--method rtn" in e.value.fix

    with pytest.raises(MixedPrecisionError) as e:
        GptqInt4._stages(["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.c_fc"])
    assert (
        e.value.code == "unsupported_architecture"
        and e.value.detail == "no calibration order known for model.layers.0.mlp.c_fc"
    )
    assert e.value.where == "model.layers.0.mlp.c_fc" and "--skip" in e.value.fix

    # a shared-expert gate is a router by name but not the experts' router
    tensors = {
        "model.layers.0.mlp.shared_expert_gate.weight": torch.ones(1, 4),
        "model.layers.0.mlp.experts.0.gate_proj.weight": torch.ones(8, 4),
    }
    with pytest.raises(MixedPrecisionError) as e:
        g._router_weight(tensors, "model.layers.0.mlp")
    assert (
        e.value.code == "unsupported_architecture" and e.value.detail == "no router weight found in model.layers.0.mlp"
    )
    assert e.value.where == "model.layers.0.mlp" and "--method rtn" in e.value.fix
