"""Train the small Qwen3-MoE model shipped in the package (python/sglang_mixed_precision/data/small_model).

    python bench/train_small_model.py [--out DIR] [--steps N] [--threads 1]

Text: the Python standard library's top-level modules (``*.py`` directly under the running
Python's ``stdlib`` directory, sorted by name), minus the held-out modules in ``HELD_OUT``; an
excerpt of one held-out module becomes ``data/eval_python.txt``, the default text of
``sglang-mp eval`` and ``sensitivity`` (the model never saw it). Tokenizer: a byte-level BPE
(``tokenizers``) of ``VOCAB`` tokens trained on the same text. Everything is seeded; one thread
makes the run reproducible on one Python and torch version.

Why Qwen3-MoE: routed experts are the unit int4 is made for, so the shipped model has attention
and experts units whose sensitivities differ, the case autoplan is about. Sizes are the smallest
that SGLang's kernels accept for every format: hidden 256, head_dim 64, MoE intermediate 128
(FP8 blocks of 128, GPTQ group 128).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "python" / "sglang_mixed_precision" / "data" / "small_model"
EVAL_TEXT = REPO / "python" / "sglang_mixed_precision" / "data" / "eval_python.txt"
HELD_OUT = ("textwrap.py", "shlex.py", "fnmatch.py", "colorsys.py", "bisect.py")
EVAL_SOURCE, EVAL_CHARS = "textwrap.py", 6000
CALIB_TEXT = REPO / "python" / "sglang_mixed_precision" / "data" / "calib_python.txt"
CALIB_SOURCES = ("shlex.py", "fnmatch.py", "colorsys.py", "bisect.py")  # held out too
VOCAB = 1024
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
SEQ, BATCH = 128, 16


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.glob("*.py") if p.name not in HELD_OUT and not p.name.startswith("__"))


def training_text(files: list[Path]) -> str:
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)


def write_held_out_texts() -> None:
    """The eval text (an excerpt of EVAL_SOURCE) and the GPTQ calibration text (CALIB_SOURCES)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    EVAL_TEXT.write_text((root / EVAL_SOURCE).read_text(encoding="utf-8")[:EVAL_CHARS], encoding="utf-8")
    CALIB_TEXT.write_text("\n\n".join((root / n).read_text(encoding="utf-8") for n in CALIB_SOURCES), encoding="utf-8")


def train_tokenizer(text: str, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sglang_mixed_precision.testing.tinymodels import CHAT_TEMPLATE

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out))
    return fast


def model_config():
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_experts=4,
        num_experts_per_tok=2,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        router_aux_loss_coef=0.01,
        bos_token_id=0,
        eos_token_id=2,
        torch_dtype="bfloat16",
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    files = stdlib_files()
    text = training_text(files)
    tokenizer = train_tokenizer(text, out)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    print(f"{len(files)} files, {len(text)} characters, {len(ids)} tokens", flush=True)
    write_held_out_texts()

    model = AutoModelForCausalLM.from_config(model_config(), dtype=torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)
    gen = torch.Generator().manual_seed(args.seed)
    log = []
    for step in range(args.steps):
        lr = args.lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / args.steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - SEQ - 1, (BATCH,), generator=gen)
        batch = torch.stack([ids[s : s + SEQ] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch, output_router_logits=True).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 25 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {lr:.2e}  {time.time() - started:.0f}s", flush=True)
            log.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - started, 1)})
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(out), safe_serialization=True)
    gen_cfg = {"bos_token_id": 0, "eos_token_id": 2, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen_cfg, indent=2) + "\n")
    record = {
        "python": sysconfig.get_python_version(),
        "torch": torch.__version__,
        "files": len(files),
        "characters": len(text),
        "tokens": len(ids),
        "held_out": list(HELD_OUT),
        "steps": args.steps,
        "batch": BATCH,
        "seq": SEQ,
        "lr": args.lr,
        "threads": args.threads,
        "seed": args.seed,
        "seconds": round(time.time() - started, 1),
        "log": log,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"done in {record['seconds']}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
