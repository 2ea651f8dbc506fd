"""The converter's fp8/ and int4/ directories load in stock SGLang and compute what they hold.

The tiny Qwen3 and Qwen3-MoE converted by the serve tests' preparation (rtn, verified) are served by
plain ``python -m sglang.launch_server`` (the MoE int4 one with ``--quantization moe_wna16``:
gpu_harness.STOCK_MOE_INT4_FLAGS says why); greedy /generate must answer, and its tokens and
log-probs must match the transformers reference of the uniform mix of that source (every linear
from it), with the serve test's tolerance.
"""

from __future__ import annotations

import pytest

import gpu_harness as h

pytestmark = pytest.mark.gpu

CASES = [
    pytest.param(arch, fmt, id=f"{arch}/{fmt}", marks=pytest.mark.servers(h.stock_server(arch, fmt)))
    for arch in h.ARCHS
    for fmt in h.STOCK_FORMATS
]


@pytest.mark.parametrize("arch, fmt", CASES)
def test_converted_checkpoint_serves_in_stock_sglang(arch, fmt, fleet, serve_work, record):
    server = fleet.server(h.stock_server(arch, fmt))
    record["ready_s"] = server.ready_s
    outputs = h.generate_each(server.url, h.prompt_ids(serve_work.source(arch, fmt)))
    assert [len(g.output_ids) for g in outputs] == [h.MAX_NEW_TOKENS] * len(h.PROMPTS)
    h.check_against_reference(serve_work.config(arch, h.STOCK_FORMATS[fmt]), outputs, record)
