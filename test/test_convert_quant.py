"""Quantization primitives of the converter: fp8 block, GPTQ int4 packing, RTN and GPTQ."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sglang_mixed_precision.convert.fp8_block import FP8_MAX, quantize_fp8_block
from sglang_mixed_precision.convert.gptq import HessianAccumulator, gptq_quantize
from sglang_mixed_precision.convert.gptq_pack import check_gptq_shape, pack_gptq, pack_qweight, rtn_quantize
from sglang_mixed_precision.core.formats.fp8 import dequant_block as dequant_fp8_block
from sglang_mixed_precision.core.formats.gptq import dequant as dequant_gptq
from sglang_mixed_precision.core.formats.gptq import unpack_int as unpack_gptq_int
from sglang_mixed_precision.core.formats.gptq import unpack_zeros as unpack_gptq_zeros


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def output_error(x: torch.Tensor, w_ref: torch.Tensor, w_q: torch.Tensor) -> tuple[float, float]:
    """(sum of squared output error, sum of squared reference output) of X W^T vs X Q^T."""
    ref = x @ w_ref.float().t()
    return float(((x @ w_q.float().t()) - ref).pow(2).sum()), float(ref.pow(2).sum())


# -- fp8 block ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(256, 512), (300, 200), (128, 128), (8, 1000)])
def test_fp8_block_round_trip_and_scale_layout(shape):
    torch.manual_seed(0)
    w = torch.randn(*shape, dtype=torch.bfloat16)
    q, s = quantize_fp8_block(w)
    assert q.dtype == torch.float8_e4m3fn and q.shape == w.shape
    assert s.dtype == torch.float32 and s.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert rel(dequant_fp8_block(q, s), w) < 0.04


def test_fp8_scale_is_tile_amax_over_448():
    w = torch.zeros(256, 256)
    w[3, 5] = -7.0  # tile (0, 0)
    w[200, 130] = 2.0  # tile (1, 1)
    q, s = quantize_fp8_block(w)
    assert s[0, 0] == pytest.approx(7.0 / FP8_MAX)
    assert s[1, 1] == pytest.approx(2.0 / FP8_MAX)
    assert float(q[3, 5].float()) == -FP8_MAX  # the tile's largest value lands on the top of the range
    assert float(dequant_fp8_block(q, s)[200, 130]) == pytest.approx(2.0)


# -- GPTQ packing ---------------------------------------------------------------------------------
def test_qweight_is_transpose_of_compressed_tensors_weight_packed():
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    torch.manual_seed(1)
    q = torch.randint(0, 16, (64, 256))  # grid integers [N, K], zero point 8
    qweight = pack_qweight(q)
    signed = (q - 8).to(torch.int8)  # compressed-tensors stores signed values, offset by 8 when packing
    weight_packed = pack_to_int32(signed, 4, packed_dim=1)  # [N, K/8]
    assert torch.equal(qweight, weight_packed.t())
    assert torch.equal(unpack_from_int32(qweight.t().contiguous(), 4, q.shape, packed_dim=1).long() + 8, q)


@settings(max_examples=30, deadline=None)
@given(n8=st.integers(1, 6), k8=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_pack_unpack_round_trip(n8, k8, seed):
    g = torch.Generator().manual_seed(seed)
    n, k = 8 * n8, 8 * k8
    q = torch.randint(0, 16, (n, k), generator=g)
    t = pack_gptq(q, torch.ones(1, n), torch.zeros(k, dtype=torch.int32))
    assert t.qweight.dtype == torch.int32 and t.qweight.shape == (k // 8, n)
    assert torch.equal(unpack_gptq_int(t.qweight), q.t())
    assert torch.equal(unpack_gptq_zeros(t.qzeros), torch.full((1, n), 8))


def test_symmetric_qzeros_are_0x77777777():
    t = rtn_quantize(torch.randn(64, 256), 128)
    assert t.qzeros.shape == (2, 8)
    assert (t.qzeros == 0x77777777).all()
    assert t.scales.dtype == torch.float16 and t.scales.shape == (2, 64)
    assert torch.equal(t.g_idx, torch.arange(256, dtype=torch.int32) // 128)


@pytest.mark.parametrize("group_size,groups", [(32, 8), (64, 4), (128, 2), (-1, 1)])
def test_rtn_round_trip(group_size, groups):
    torch.manual_seed(2)
    w = torch.randn(128, 256)
    t = rtn_quantize(w, group_size)
    assert t.scales.shape == (groups, 128)
    assert rel(dequant_gptq(t.qweight, t.qzeros, t.scales, t.g_idx), w) < 0.13


def test_shape_checks_name_the_tensor():
    assert check_gptq_shape("x.weight", 64, 200, 128) and "x.weight" in check_gptq_shape("x.weight", 64, 200, 128)
    assert check_gptq_shape("x.weight", 60, 256, 128)  # N not a multiple of 8
    assert check_gptq_shape("x.weight", 64, 256, 128) is None
    assert check_gptq_shape("x.weight", 64, 200, -1) is None


# -- GPTQ -----------------------------------------------------------------------------------------
def structured_activations(basis, m, gen):
    """Low-rank correlated activations with a few outlier channels (what real LLM inputs look like)."""
    x = torch.randn(m, basis.shape[0], generator=gen) @ basis + 0.3 * torch.randn(m, basis.shape[1], generator=gen)
    x[:, :6] *= 8
    return x


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [128, 32, -1])
def test_gptq_beats_rtn_on_heldout_activations(act_order, group_size):
    gen = torch.Generator().manual_seed(3)
    k, n = 512, 192
    basis = torch.randn(48, k, generator=gen)
    w = torch.randn(n, k, generator=gen) / k**0.5
    h = HessianAccumulator(k)
    h.add(structured_activations(basis, 2048, gen))
    heldout = structured_activations(basis, 1024, gen)
    res = gptq_quantize(w, h.hessian, group_size=group_size, act_order=act_order)
    t = res.tensors
    deq = dequant_gptq(t.qweight, t.qzeros, t.scales, t.g_idx)
    assert torch.allclose(deq, res.dequantized, atol=1e-6)  # independent dequantizer agrees
    r = rtn_quantize(w, group_size)
    gptq_err = output_error(heldout, w, deq)
    rtn_err = output_error(heldout, w, dequant_gptq(r.qweight, r.qzeros, r.scales, r.g_idx))
    print(
        f"act_order={act_order} g={group_size}: gptq {gptq_err[0] / gptq_err[1]:.5f} rtn {rtn_err[0] / rtn_err[1]:.5f}"
    )
    assert gptq_err[0] < 0.5 * rtn_err[0]


def test_act_order_g_idx_follows_the_permutation():
    gen = torch.Generator().manual_seed(4)
    k = 256
    x = torch.randn(512, k, generator=gen) * torch.linspace(0.1, 5, k)  # channel importance rises with k
    h = HessianAccumulator(k)
    h.add(x)
    res = gptq_quantize(torch.randn(64, k, generator=gen), h.hessian, group_size=64, act_order=True)
    g_idx = res.tensors.g_idx
    assert torch.equal(torch.bincount(g_idx.long()), torch.full((4,), 64))  # every group has 64 columns
    assert g_idx[-1] == 0 and g_idx[0] == 3  # most important (last) channels were quantized first
    assert not torch.equal(g_idx, torch.arange(k, dtype=torch.int32) // 64)


def test_hessian_accumulator_is_mean_of_outer_products():
    x = torch.randn(100, 16)
    h = HessianAccumulator(16)
    h.add(x[:30])
    h.add(x[30:])
    assert torch.allclose(h.hessian, 2 * x.t() @ x / 100, atol=1e-4)
