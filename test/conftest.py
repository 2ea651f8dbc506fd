"""Shared fixtures: tiny random-weight checkpoints generated once per test session (no network)."""

from __future__ import annotations

import pytest

from sglang_mixed_precision.testing.tinymodels import make_tiny_model


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory):
    return make_tiny_model("qwen3", tmp_path_factory.mktemp("qwen3") / "bf16")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory):
    return make_tiny_model("qwen3_moe", tmp_path_factory.mktemp("qwen3_moe") / "bf16")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama") / "bf16", max_shard_size="2MB")


@pytest.fixture(scope="session")
def moe_sources(tiny_qwen3_moe, tmp_path_factory):
    """The tiny Qwen3-MoE as three sources: 16-bit, fp8-block and GPTQ-int4 (two shards)."""
    from ckpt_writers import write_fp8_checkpoint, write_gptq_checkpoint

    root = tmp_path_factory.mktemp("moe_sources")
    return {
        "fp16": tiny_qwen3_moe,
        "fp8": write_fp8_checkpoint(tiny_qwen3_moe, root / "fp8"),
        "int4": write_gptq_checkpoint(tiny_qwen3_moe, root / "int4", shards=2),
    }
