"""The generated test models: clear greedy margins where the GPU proofs compare tokens."""

import torch
from transformers import AutoModelForCausalLM

from sglang_mixed_precision.testing.tinymodels import make_tiny_model

PROMPTS = [[5, 17, 300, 41, 9, 77], [1000, 3, 3, 250, 600]]


def _next_token_logprobs(model, ids):
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), -1)


def _greedy(model, ids, steps=8):
    ids, gaps = list(ids), []
    for _ in range(steps):
        lp = _next_token_logprobs(model, ids)
        top = lp.topk(2).values
        gaps.append(float(top[0] - top[1]))
        ids.append(int(lp.argmax()))
    return ids, min(gaps)


def test_clear_margins_make_bf16_and_fp32_agree_token_for_token_while_layers_still_count(tmp_path):
    path = make_tiny_model("qwen3", tmp_path / "m", clear_margins=True)
    fp32 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    for prompt in PROMPTS:
        ids32, gap = _greedy(fp32, prompt)
        assert _greedy(bf16, prompt)[0] == ids32
        assert gap > 1.0, f"greedy margin {gap:.3f} nats is not clear"
    # The layers still shape the distribution: swapping one MLP's weights moves the chosen token's log-prob.
    before = _next_token_logprobs(fp32, PROMPTS[0])
    with torch.no_grad():
        down = fp32.model.layers[1].mlp.down_proj.weight
        down.copy_(torch.randn_like(down) / down.shape[1] ** 0.5)
    after = _next_token_logprobs(fp32, PROMPTS[0])
    t = int(before.argmax())
    assert abs(float(before[t] - after[t])) > 0.05


def test_tied_embeddings_get_a_clear_margin_on_the_current_token(tmp_path):
    """lm_head is the embedding: greedy decoding repeats the last token, by a clear margin in bf16 and
    fp32 alike, and the layers still move the log-probs."""
    path = make_tiny_model("qwen3_tied", tmp_path / "m", clear_margins=True)
    fp32 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    bf16 = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.bfloat16).eval()
    assert fp32.config.tie_word_embeddings and fp32.lm_head.weight is fp32.model.embed_tokens.weight
    for prompt in PROMPTS:
        ids32, gap = _greedy(fp32, prompt)
        assert _greedy(bf16, prompt)[0] == ids32
        assert ids32[len(prompt) :] == [prompt[-1]] * 8
        assert gap > 1.0, f"greedy margin {gap:.3f} nats is not clear"
    before = _next_token_logprobs(fp32, PROMPTS[0])
    with torch.no_grad():
        down = fp32.model.layers[1].mlp.down_proj.weight
        down.copy_(torch.randn_like(down) / down.shape[1] ** 0.5)
    assert (before - _next_token_logprobs(fp32, PROMPTS[0])).abs().max() > 0.05


def test_an_unknown_architecture_is_named():
    import re

    import pytest

    from sglang_mixed_precision.testing.tinymodels import ARCHITECTURES, tiny_config

    assert {"qwen3", "qwen3_moe", "llama", "qwen2", "qwen2_moe", "mixtral", "qwen3_tied", "deepseek_v3"} <= set(
        ARCHITECTURES
    )
    with pytest.raises(
        ValueError, match=re.escape(f"unknown tiny architecture 'gpt_neox'; choose one of {ARCHITECTURES}")
    ):
        tiny_config("gpt_neox")
