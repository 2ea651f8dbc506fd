"""The converter's device path on CPU: batched GPTQ equals the per-expert path, conversions with
batching and reader / writer threads on equal those without, failures in either thread reach the
caller as the same error (no hang, no thread left behind), and --device cuda without a GPU is named."""

from __future__ import annotations

import errno
import json
import threading
import time

import pytest
import torch

from gptq_reference import reference_gptq
from sglang_mixed_precision.convert import writer as writer_mod
from sglang_mixed_precision.convert.gptq import GptqResult, HessianAccumulator, gptq_quantize, gptq_quantize_batched
from sglang_mixed_precision.convert.model_dir import InputModel
from sglang_mixed_precision.convert.overlap import BackgroundWriter, Prefetcher
from sglang_mixed_precision.convert.pipeline import ConvertOptions, convert
from sglang_mixed_precision.core.errors import ErrorCode, MixedPrecisionError
from sglang_mixed_precision.core.formats.gptq import unpack_int
from test_convert_pipeline import read_all


def opts(model, out, **kw) -> ConvertOptions:
    kw.setdefault("method", "gptq")
    kw.setdefault("nsamples", 4)
    kw.setdefault("seqlen", 128)
    kw.setdefault("check", False)
    kw.setdefault("min_expert_tokens", 16)
    return ConvertOptions(str(model), str(out), progress=False, device="cpu", **kw)


def converter_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("convert-")]


def assert_same_tensors(a: dict, b: dict, where: str) -> None:
    assert set(a) == set(b), where
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), f"{where}: {k}"


def assert_close_gptq(ref, got, where: str) -> None:
    """One matrix's GPTQ within float tolerance of the reference: g_idx equal, scales close, the 4-bit
    integers equal but for rare rounding ties (an addr_ and a batched matmul may round the last bit
    differently, and a tie moves one value by one step), dequantized weights close."""
    assert torch.equal(ref.tensors.g_idx, got.tensors.g_idx), where
    torch.testing.assert_close(ref.tensors.scales, got.tensors.scales, rtol=1e-3, atol=0, msg=where)
    qa, qb = unpack_int(ref.tensors.qweight), unpack_int(got.tensors.qweight)
    assert (qa != qb).float().mean() <= 1e-3, where
    rel = (ref.dequantized - got.dequantized).norm() / ref.dequantized.norm()
    assert rel < 1e-3, f"{where}: {rel}"


# -- batched GPTQ --------------------------------------------------------------------------------
def _experts(b: int, n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(b, n, k, generator=g)
    hessians = []
    for e in range(b):
        x = torch.randn(4 * k, k, generator=g) * torch.rand(k, generator=g) * 3
        if e == 1:
            x[:, 3] = 0  # a dead input channel in one expert only
        h = HessianAccumulator(k)
        h.add(x)
        hessians.append(h.hessian)
    return weights, torch.stack(hessians)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [64, -1])
def test_batched_gptq_equals_the_per_expert_path(act_order, group_size):
    weights, hessians = _experts(4, 32, 256)
    kw = dict(group_size=group_size, act_order=act_order)
    batch = gptq_quantize_batched(weights, hessians, **kw)
    for e in range(4):
        got = GptqResult(batch.tensors[e], batch.dequantized[e])
        # the column loop of rank-1 updates it replaces: the same algorithm within float tolerance
        assert_close_gptq(reference_gptq(weights[e], hessians[e], **kw), got, f"expert {e} vs reference")
        # one expert at a time through the same kernels: the same bits
        one = gptq_quantize(weights[e], hessians[e], **kw)
        assert torch.equal(one.dequantized, got.dequantized)
        assert_same_tensors(one.tensors.as_dict("m"), got.tensors.as_dict("m"), f"expert {e} alone")
    # each expert kept its own Hessian: quantizing with another's gives another result
    other = gptq_quantize(weights[0], hessians[2], group_size=group_size, act_order=act_order)
    assert not torch.equal(other.dequantized, batch.dequantized[0])


def test_batched_gptq_dampens_each_expert_on_its_own():
    """One expert's Hessian is rank-deficient (needs extra dampening); the others must not get it."""
    weights, hessians = _experts(3, 16, 64, seed=1)
    hessians[1] = 2 * torch.ones(64, 64) - torch.eye(64)  # eigenvalues -1 (x63) and 127: indefinite
    assert torch.linalg.cholesky_ex(hessians[1] + 0.01 * torch.eye(64)).info != 0  # the usual dampening fails
    batch = gptq_quantize_batched(weights, hessians, group_size=64)
    for e in (0, 2):
        one = gptq_quantize(weights[e], hessians[e], group_size=64)
        assert torch.equal(one.dequantized, batch.dequantized[e])
    alone = reference_gptq(weights[1], hessians[1], group_size=64)  # the reference dampens it the same way
    assert_close_gptq(alone, GptqResult(batch.tensors[1], batch.dequantized[1]), "singular expert")


# -- the reader / writer threads ---------------------------------------------------------------
def test_prefetcher_keeps_order_and_runs_a_bounded_way_ahead():
    loaded, consumed = [], []

    def load(i):
        loaded.append(i)
        return i * i

    for item, value in Prefetcher(range(8), load, depth=1):
        time.sleep(0.02)  # a slow consumer: the reader must wait for it, not run through the list
        assert value == item * item
        assert len(loaded) - len(consumed) <= 3  # queued (1) + being loaded (1) + this one
        consumed.append(item)
    assert consumed == list(range(8)) and converter_threads() == []


def test_prefetcher_reraises_the_loaders_error_and_stops():
    error = MixedPrecisionError(ErrorCode.CORRUPT_SAFETENSORS, "truncated", where="x.safetensors")

    def load(i):
        if i == 2:
            raise error
        return i

    got = []
    with pytest.raises(MixedPrecisionError) as e:
        for item, _ in Prefetcher(range(5), load, depth=2):
            got.append(item)
    assert e.value is error and got == [0, 1]
    assert converter_threads() == []


def test_background_writer_writes_in_order_and_reraises():
    written = []
    w = BackgroundWriter(written.append, depth=2)
    for i in range(20):
        w.submit(i)
    w.close()
    assert written == list(range(20))

    error = OSError(errno.ENOSPC, "No space left on device")

    def fail_at_3(i):
        if i == 3:
            raise error
        written.append(i)

    written.clear()
    w = BackgroundWriter(fail_at_3, depth=1)
    with pytest.raises(OSError) as e:
        for i in range(100):  # the error arrives at a later hand-off, never a hang
            w.submit(i)
        w.close()
    assert e.value is error and written == [0, 1, 2]
    w.abort()
    assert converter_threads() == []


# -- conversions: batched / threaded equal the per-expert, inline path -----------------------
@pytest.fixture(scope="module")
def per_expert_inline(tiny_qwen3_moe, tmp_path_factory):
    out = tmp_path_factory.mktemp("inline")
    convert(opts(tiny_qwen3_moe, out, formats=("fp8", "int4"), expert_batch=1, overlap=False))
    return out


def test_batched_threaded_conversion_matches_the_per_expert_inline_one(tiny_qwen3_moe, per_expert_inline, tmp_path):
    report = convert(opts(tiny_qwen3_moe, tmp_path, formats=("fp8", "int4"), expert_batch=8, overlap=True))
    for fmt in ("fp8", "int4"):  # the same kernels in the same order: the same bits
        assert_same_tensors(read_all(per_expert_inline / fmt), read_all(tmp_path / fmt), fmt)
    assert report.int4_method["expert_tokens"]  # experts were routed and quantized by GPTQ
    assert converter_threads() == []


def _run_with_deadline(fn, seconds: float = 300):
    """fn() in a thread; its exception, or a failure if it does not return in time (a hang)."""
    result: dict = {}

    def target():
        try:
            fn()
        except BaseException as e:
            result["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), "the conversion hung after a failure in a thread"
    return result.get("error")


def test_a_reader_failure_reaches_the_caller_as_the_same_error(tiny_qwen3_moe, tmp_path, monkeypatch):
    real_read = InputModel.read
    error = MixedPrecisionError(ErrorCode.CORRUPT_SAFETENSORS, "injected", where="model.layers.1")

    def failing_read(self, name):
        if name.startswith("model.layers.1."):
            raise error
        return real_read(self, name)

    monkeypatch.setattr(InputModel, "read", failing_read)
    got = _run_with_deadline(lambda: convert(opts(tiny_qwen3_moe, tmp_path, method="rtn", overlap=True)))
    assert got is error
    assert converter_threads() == []
    assert not list(tmp_path.rglob("*.body"))  # the shard in flight was dropped


def test_a_writer_failure_reaches_the_caller_and_the_run_resumes(
    tiny_qwen3_moe, per_expert_inline, tmp_path, monkeypatch
):
    real_add = writer_mod.ShardedWriter.add
    error = OSError(errno.ENOSPC, "No space left on device (injected)")

    def failing_add(self, name, t):
        if self.out_dir.name == "int4" and name.startswith("model.layers.1."):
            self.close_shard()
            raise error
        return real_add(self, name, t)

    monkeypatch.setattr(writer_mod.ShardedWriter, "add", failing_add)
    kw = dict(formats=("fp8", "int4"), expert_batch=8, overlap=True, max_shard_size="2MB")
    got = _run_with_deadline(lambda: convert(opts(tiny_qwen3_moe, tmp_path, **kw)))
    # the writer thread's error reaches the caller, named (a full disk) with the injected one as its cause
    assert got.code == "disk_full" and got.__cause__ is error
    assert converter_threads() == [] and not list(tmp_path.rglob("*.body"))
    monkeypatch.setattr(writer_mod.ShardedWriter, "add", real_add)
    report = convert(opts(tiny_qwen3_moe, tmp_path, **kw))  # resume: finished shards kept
    assert sum(report.resumed_shards.values()) > 0
    for fmt in ("fp8", "int4"):
        assert_same_tensors(read_all(per_expert_inline / fmt), read_all(tmp_path / fmt), f"resumed {fmt}")


# -- the device ------------------------------------------------------------------------------
def test_cuda_without_a_gpu_is_a_named_error_before_writing(tiny_qwen3, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o"
    with pytest.raises(MixedPrecisionError) as e:
        convert(ConvertOptions(str(tiny_qwen3), str(out), method="rtn", progress=False, device="cuda"))
    assert e.value.code is ErrorCode.BAD_DEVICE and "--device cpu" in e.value.fix
    assert not out.exists()


@pytest.mark.parametrize("name", ["tpu", "cuda:x"])
def test_unknown_device_is_a_named_error(name):
    from sglang_mixed_precision.convert.device import resolve_device

    with pytest.raises(MixedPrecisionError) as e:
        resolve_device(name)
    assert e.value.code is ErrorCode.BAD_DEVICE


def test_default_device_follows_the_gpu(monkeypatch):
    from sglang_mixed_precision.convert.device import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None).type == "cpu"


def test_cli_device_flags_reach_the_converter(tiny_qwen3, tmp_path, monkeypatch, capsys):
    from sglang_mixed_precision.cli import main as cli_main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "o"
    argv = ["convert", "--model_path", str(tiny_qwen3), "--output_dir", str(out), "--method", "rtn", "--no_progress"]
    assert cli_main([*argv, "--device", "cuda"]) == 2
    assert "[bad_device]" in capsys.readouterr().err and not out.exists()
    assert cli_main([*argv, "--expert_batch", "-1"]) == 2
    assert "[bad_argument]" in capsys.readouterr().err and not out.exists()
    assert cli_main([*argv, "--device", "cpu", "--overlap", "on", "--formats", "fp8", "--no_check"]) == 0
    report = json.loads((out / "convert_report.json").read_text())
    assert report["device"] == "cpu" and set(report["unit_seconds"]) == {"non-layer tensors", "layer 0", "layer 1"}
    assert report["peak_host_bytes"] > 0 and report["peak_device_bytes"] is None
