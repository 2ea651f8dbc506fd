"""Small random-weight Hugging Face models of every family the project serves, built offline.

Used by the demo, the tests and the GPU proofs: real transformers configs and modules, random
weights, a byte-level BPE tokenizer trained on the bundled corpus, no network. Sizes default to
what SGLang's kernels accept (hidden 512, head_dim 128, MoE intermediate 256).
"""

from __future__ import annotations

import json
from pathlib import Path

# demo / test name -> transformers family; "qwen3_tied" is a Qwen3-0.6B-like model whose lm_head is
# its embedding (tie_word_embeddings: true).
ARCHITECTURES = ("qwen3", "qwen3_moe", "llama", "qwen2", "qwen2_moe", "mixtral", "qwen3_tied", "deepseek_v3")
# Every MoE family: 8 experts of intermediate 256, 2 per token.
MOE = {"moe_intermediate_size": 256, "num_experts_per_tok": 2}

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_text() -> str:
    """The small calibration / tokenizer corpus shipped in the package."""
    return (Path(__file__).parents[1] / "data" / "calibration.txt").read_text(encoding="utf-8")


def tiny_config(arch: str, *, num_layers: int = 2, hidden: int = 512, vocab: int = 2048, **overrides):
    """A transformers config of the given architecture with kernel-friendly sizes."""
    from transformers import LlamaConfig, MixtralConfig, Qwen2Config, Qwen2MoeConfig, Qwen3Config, Qwen3MoeConfig

    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=128,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )
    dense = {**common, "intermediate_size": 2 * hidden}
    qwen_moe = {**dense, **MOE, "num_experts": 8, "decoder_sparse_step": 1, "mlp_only_layers": []}
    builders = {
        "qwen3": lambda: Qwen3Config(**{**dense, **overrides}),
        "qwen3_tied": lambda: Qwen3Config(**{**dense, "tie_word_embeddings": True, **overrides}),
        "qwen3_moe": lambda: Qwen3MoeConfig(**{**qwen_moe, "norm_topk_prob": True, **overrides}),
        "llama": lambda: LlamaConfig(**{**dense, **overrides}),
        # q/k/v carry biases (Qwen2 always builds them)
        "qwen2": lambda: Qwen2Config(**{**dense, **overrides}),
        # shared expert (gate/up/down) behind a sigmoid shared_expert_gate, beside the routed experts
        "qwen2_moe": lambda: Qwen2MoeConfig(
            **{**qwen_moe, "shared_expert_intermediate_size": hidden, "norm_topk_prob": False, **overrides}
        ),
        # block_sparse_moe.experts.E.{w1,w2,w3}; Mixtral's intermediate_size is each expert's
        "mixtral": lambda: MixtralConfig(
            **{
                **common,
                "intermediate_size": MOE["moe_intermediate_size"],
                "num_local_experts": 8,
                "num_experts_per_tok": MOE["num_experts_per_tok"],
                **overrides,
            }
        ),
        "deepseek_v3": lambda: deepseek_v3_config(common, hidden, overrides),
    }
    if arch not in builders:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {ARCHITECTURES}")
    return builders[arch]()


def deepseek_v3_config(common: dict, hidden: int, overrides: dict):
    """DeepSeek-V3 in miniature: MLA with the release's head dimensions (kv_lora_rank 512, rope 64, nope
    128, v 128; q_lora_rank a multiple of 128 so the fused q_a/kv_a weight keeps whole FP8 blocks), layer
    0 dense (first_k_dense_replace), then MoE layers of 8 routed experts in 2 groups and one shared
    expert, routed by sigmoid scores plus e_score_correction_bias (noaux_tc), as the release."""
    from transformers import DeepseekV3Config

    common = {k: v for k, v in common.items() if k not in ("head_dim", "num_key_value_heads")}
    return DeepseekV3Config(
        **{
            **common,
            "num_key_value_heads": common["num_attention_heads"],
            "intermediate_size": 2 * hidden,
            "moe_intermediate_size": 256,
            "n_routed_experts": 8,
            "n_shared_experts": 1,
            "num_experts_per_tok": 2,
            "n_group": 2,
            "topk_group": 1,
            "first_k_dense_replace": 1,
            "norm_topk_prob": True,
            "routed_scaling_factor": 2.5,
            "q_lora_rank": 256,
            "kv_lora_rank": 512,
            "qk_rope_head_dim": 64,
            "qk_nope_head_dim": 128,
            "v_head_dim": 128,
            # keys of the release's config.json that SGLang reads and transformers' class does not declare
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "moe_layer_freq": 1,
            "num_nextn_predict_layers": 0,
            **overrides,
        }
    )


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Train a byte-level BPE on the bundled corpus and save it as a fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(vocab_size, 1024),
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text().splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))


def make_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    hidden: int = 512,
    vocab: int = 2048,
    seed: int = 0,
    max_shard_size: str | None = None,
    clear_margins: bool = False,
    **overrides,
) -> Path:
    """Write a random-weight bf16 model directory (config, safetensors, tokenizer) and return it.

    clear_margins: give greedy decoding a margin of several nats (see `_set_clear_margins`), so that
    two correct bf16 implementations pick the same tokens; off, top-2 logits of a random model are
    often within 0.01 nats, below the noise of bf16 arithmetic.
    """
    import torch
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = tiny_config(arch, num_layers=num_layers, hidden=hidden, vocab=vocab, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16)
    # transformers' default init (std 0.02) gives near-uniform logits; a wider spread makes
    # greedy tokens depend visibly on every layer, which the correctness proofs rely on.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 1.0 / p.shape[1] ** 0.5)
        if clear_margins:
            _set_clear_margins(model, seed)
        _randomize_router_biases(model, seed)
    kwargs = {"safe_serialization": True}
    if max_shard_size:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(str(out), **kwargs)
    write_tokenizer(out, vocab)
    gen = {"bos_token_id": 0, "eos_token_id": 2, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2))
    return out


def _randomize_router_biases(model, seed: int) -> None:
    """DeepSeek-V3's e_score_correction_bias (zeros after init) gets values that change which experts
    win, in float32 as the release stores it: a loader that dropped it would route differently."""
    import torch

    gen = torch.Generator().manual_seed(seed + 2)
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            module.e_score_correction_bias = torch.randn(bias.shape, generator=gen, dtype=torch.float32) * 0.1


# Logit of the planned next token: c * cos(final hidden state, its embedding direction), c in nats.
MARGIN_SCALE = 8.0


def _set_clear_margins(model, seed: int) -> None:
    """Embeddings of unit-rms random directions; lm_head row j points at the embedding of the token
    that a fixed random permutation maps to j. The current token's embedding dominates the final
    hidden state, so the permuted successor wins by >2 nats (measured on CPU: 2.6 dense, 3.9 MoE at
    the default sizes), while every layer still moves the log-probs (the softmax's other 2k logits
    follow the layers' output): a wrong weight shows in the log-probs, a near-tie never flips a token.
    """
    import torch

    emb = model.get_input_embeddings().weight
    vocab, hidden = emb.shape
    gen = torch.Generator().manual_seed(seed + 1)
    directions = torch.nn.functional.normalize(torch.randn(vocab, hidden, generator=gen), dim=1)
    emb.copy_(directions * hidden**0.5)
    if model.config.tie_word_embeddings:
        _set_tied_margins(model, hidden)
        return
    head = model.get_output_embeddings().weight
    successor = torch.randperm(vocab, generator=gen)
    head.copy_(directions[successor.argsort()] * (MARGIN_SCALE / hidden**0.5))


def _set_tied_margins(model, hidden: int) -> None:
    """Tied embeddings: lm_head is the embedding, so the token whose embedding dominates the final
    hidden state is the current one. The final norm's weight scales the logits so that it wins by
    the same few nats as a planned successor does (logit = MARGIN_SCALE * cos): greedy decoding
    repeats a token, and the other logits still follow every layer."""
    import torch

    with torch.no_grad():
        # the normed state and an embedding both have norm sqrt(hidden): their product is hidden * cos
        model.model.norm.weight.fill_(MARGIN_SCALE / hidden)
