"""Reference forward pass: transformers, with every module's weights taken from its planned source.

The correctness oracle for the GPU proofs, and the way a machine without a GPU runs a mix. The model
is built from the skeleton's ``config.json`` (``AutoModelForCausalLM.from_config``); each parameter
is filled from the source the plan assigns to its module: 16-bit tensors as stored, fp8 and GPTQ
modules dequantized with the converter's independent dequantizers (``convert.dequant``).
transformers stores MoE experts fused (``experts.gate_up_proj [E, 2I, H]``, ``experts.down_proj
[E, H, I]``) while checkpoints store one module per expert; the loader stacks them.

``simulate_w8a8`` also models what SGLang's FP8 block kernels do to activations: each fp8 module's
input is quantized per token and group of 128 channels to float8_e4m3 with a dynamic scale
(``amax / 448``), then dequantized. GPTQ-Marlin is weight-only (W4A16): its inputs stay as they are.

``logprob_deviation`` and ``logprob_tolerance`` are the GPU proofs' check of a bf16 implementation
(SGLang) against the reference in fp32, with the reference in bf16 as the measure of bf16 noise.
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from .core.architectures import transformers_name
from .core.errors import ErrorCode, MixedPrecisionError
from .tensors import read_tensor

FP8_MAX = 448.0  # largest float8_e4m3fn
ACT_GROUP = 128  # SGLang's per-token-group activation quantization width for block FP8
# checkpoint expert projection -> (transformers fused parameter, position inside it)
_EXPERT_PARTS = {
    "gate_proj": ("gate_up_proj", 0),
    "w1": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
    "w3": ("gate_up_proj", 1),
    "down_proj": ("down_proj", 0),
    "w2": ("down_proj", 0),
}


@dataclass
class ReferenceOutput:
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    logits: torch.Tensor  # [generated tokens, vocab] float32: the logits each greedy token was taken from
    prompt: str | None = None

    @property
    def logprobs(self) -> torch.Tensor:
        return torch.log_softmax(self.logits.float(), dim=-1)


# ---- weights --------------------------------------------------------------------------------
def module_weights(plan, module: str) -> dict[str, torch.Tensor]:
    """A module's 16-bit-equivalent tensors ({"weight": ..., "bias": ...}) from its planned source:
    16-bit tensors as stored, quantized ones dequantized by their format (float32)."""
    a = plan.modules[module]
    source = plan.sources[a.label]
    raw = {suffix: read_tensor(source, info.name) for suffix, info in a.tensors.items()}
    return a.scheme.format.dequantize(a.scheme, raw)


def fill_model(model: torch.nn.Module, plan) -> None:
    """Copy every planned module into ``model``'s parameters (and buffers a checkpoint stores, such
    as DeepSeek-V3's ``e_score_correction_bias``); every parameter must be filled."""
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    tied = _tied_names(model)
    in_memory = functools.partial(transformers_name, plan.geometry.model_type)
    done: set[str] = set()
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for module, a in plan.modules.items():
        ref = a.ref
        tensors = module_weights(plan, module)
        if ref.expert is not None:
            leaf = module.rsplit(".", 1)[-1]
            experts.setdefault(in_memory(ref.group), {}).setdefault(ref.expert, {})[leaf] = tensors["weight"]
            continue
        for suffix, tensor in tensors.items():
            name = in_memory(f"{module}.{suffix}")
            if name not in params and name in buffers:
                _copy(buffers[name], tensor, name)
                continue
            if name not in params:
                if name in tied:
                    continue
                raise MixedPrecisionError(
                    ErrorCode.REFERENCE_NO_PARAMETER,
                    f"the transformers model has no parameter {name}",
                    where=str(plan.skeleton_path / "config.json"),
                    fix="the reference supports the architectures transformers builds from config.json",
                )
            _copy(params[name], tensor, name)
            done.add(name)
    for base, per_expert in experts.items():
        done |= _fill_experts(params, base, per_expert)
    missing = sorted(set(params) - done - tied)
    if missing:
        raise MixedPrecisionError(
            ErrorCode.REFERENCE_UNFILLED,
            f"{len(missing)} parameter(s) have no planned source: {', '.join(missing[:5])}",
            fix="the plan must cover every tensor of the model",
        )


def _fill_experts(params: dict, base: str, per_expert: dict) -> set[str]:
    """Stack per-expert checkpoint modules into transformers' fused expert parameters; returns their names."""
    filled = set()
    for fused in ("gate_up_proj", "down_proj"):
        name = f"{base}.{fused}"
        if name not in params:
            raise MixedPrecisionError(
                ErrorCode.REFERENCE_NO_PARAMETER,
                f"the transformers model has no fused expert parameter {name}",
                fix="the reference stacks experts for models with fused experts (transformers 5)",
            )
        parts = []
        for e in sorted(per_expert):
            pieces = sorted(
                (_EXPERT_PARTS[leaf][1], w) for leaf, w in per_expert[e].items() if _EXPERT_PARTS[leaf][0] == fused
            )
            parts.append(torch.cat([w for _, w in pieces], dim=0))
        _copy(params[name], torch.stack(parts), name)
        filled.add(name)
    return filled


def _copy(param: torch.nn.Parameter, tensor: torch.Tensor, name: str) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise MixedPrecisionError(
            ErrorCode.REFERENCE_SHAPE,
            f"{name}: source gives {tuple(tensor.shape)}, the model has {tuple(param.shape)}",
            fix="the sources must be of the skeleton's model size",
        )
    with torch.no_grad():
        param.copy_(tensor.to(param.dtype))


def _tied_names(model) -> set[str]:
    tied = getattr(model.config, "tie_word_embeddings", False)
    return {"lm_head.weight"} if tied else set()


# ---- W8A8 activation model -------------------------------------------------------------------
def fake_quant_fp8_activation(x: torch.Tensor, group: int = ACT_GROUP) -> torch.Tensor:
    """Per token and group of ``group`` channels: scale = amax / 448, round to e4m3, scale back."""
    shape = x.shape
    if shape[-1] % group:
        raise MixedPrecisionError(
            ErrorCode.REFERENCE_ACT_GROUP, f"activation width {shape[-1]} is not a multiple of {group}"
        )
    g = x.float().reshape(-1, shape[-1] // group, group)
    scale = g.abs().amax(dim=-1, keepdim=True).clamp(min=1e-10) / FP8_MAX
    q = (g / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float() * scale
    return q.reshape(shape).to(x.dtype)


class MlaPaths:
    """Which of SGLang's two MLA computations the reference is modelling.

    SGLang runs a fresh prompt through MHA: ``kv_b_proj`` is an FP8 linear, so its input (the KV
    latent) is quantized per token group. It decodes with ``kv_b_proj`` absorbed (``w_kc`` /
    ``w_vc``, its weight dequantized to the model dtype after loading): the latent is never
    quantized, for the prompt's cached tokens too. So the reference computes the prompt's positions
    with ``decode`` off and every later position by a full pass with ``decode`` on (no KV cache)."""

    def __init__(self):
        self.decode = False

    def hook(self, module, args):
        return args if self.decode else (fake_quant_fp8_activation(args[0]), *args[1:])


def mla_paths(model: torch.nn.Module) -> MlaPaths | None:
    """The model's :class:`MlaPaths` when an FP8 ``kv_b_proj`` makes SGLang's two paths differ."""
    return getattr(model, "sglang_mla_paths", None)


def simulate_fp8_activations(model: torch.nn.Module, plan) -> int:
    """Quantize the inputs of the model's fp8 modules as SGLang's W8A8 kernels do; returns how many."""
    modules = dict(model.named_modules())
    in_memory = functools.partial(transformers_name, plan.geometry.model_type)
    count = 0
    quantized_inputs = [a for a in plan.modules.values() if a.scheme.format.quantizes_activations(a.scheme)]
    fp8_experts = {in_memory(a.ref.group) for a in quantized_inputs if a.ref.expert is not None}
    for a in quantized_inputs:
        name = in_memory(a.name)
        if a.ref.expert is None and isinstance(modules.get(name), torch.nn.Linear):
            if name.endswith(".kv_b_proj") and plan.geometry.mla is not None:
                if mla_paths(model) is None:
                    model.sglang_mla_paths = MlaPaths()
                modules[name].register_forward_pre_hook(mla_paths(model).hook)
            else:
                modules[name].register_forward_pre_hook(
                    lambda mod, args: (fake_quant_fp8_activation(args[0]), *args[1:])
                )
            count += 1
    for group in fp8_experts:
        experts = modules[group]
        experts.forward = types.MethodType(_quantized_experts_forward, experts)
        count += 1
    return count


def _quantized_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' fused-experts loop, with both expert GEMM inputs fake-quantized to fp8."""
    act = self.act_fn
    out = torch.zeros_like(hidden_states)
    for e in torch.unique(top_k_index).tolist():
        token, slot = torch.where(top_k_index == e)
        x = fake_quant_fp8_activation(hidden_states[token])
        gate, up = torch.nn.functional.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)
        h = fake_quant_fp8_activation(act(gate) * up)
        y = torch.nn.functional.linear(h, self.down_proj[e]) * top_k_weights[token, slot, None]
        out.index_add_(0, token, y.to(out.dtype))
    return out


# ---- model, tokenizer, generation -------------------------------------------------------------
def build_reference_model(
    plan, *, dtype: torch.dtype = torch.float32, device: str = "cpu", simulate_w8a8: bool = False
) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(plan.skeleton_path))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fill_model(model, plan)
    if simulate_w8a8:
        simulate_fp8_activations(model, plan)
    return model.eval()


def load_tokenizer(plan):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(plan.skeleton_path))


@torch.no_grad()
def greedy(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the float32 logits each was chosen from (KV-cached decoding)."""
    if mla_paths(model) is not None:
        return _greedy_two_paths(model, prompt_ids, max_new_tokens)
    device = next(model.parameters()).device
    ids = torch.tensor([prompt_ids], device=device)
    out = model(input_ids=ids, use_cache=True)
    tokens, logits = [], []
    for _ in range(max_new_tokens):
        step = out.logits[0, -1].float()
        token = int(step.argmax())
        tokens.append(token)
        logits.append(step.cpu())
        if len(tokens) < max_new_tokens:  # no forward for the last token: nothing follows it
            out = model(
                input_ids=torch.tensor([[token]], device=device), past_key_values=out.past_key_values, use_cache=True
            )
    return tokens, torch.stack(logits) if logits else torch.empty(0)


@torch.no_grad()
def _greedy_two_paths(model, prompt_ids: list[int], max_new_tokens: int) -> tuple[list[int], torch.Tensor]:
    """Greedy decoding as SGLang computes MLA (:class:`MlaPaths`): the first token from the prompt's
    pass, each later one from a full pass in the decode path."""
    paths, device = mla_paths(model), next(model.parameters()).device
    ids, tokens, logits = list(prompt_ids), [], []
    for step in range(max_new_tokens):
        paths.decode = step > 0
        try:
            last = model(input_ids=torch.tensor([ids], device=device)).logits[0, -1].float()
        finally:
            paths.decode = False
        tokens.append(int(last.argmax()))
        logits.append(last.cpu())
        ids.append(tokens[-1])
    return tokens, torch.stack(logits) if logits else torch.empty(0)


@torch.no_grad()
def teacher_forced_logprobs(model, ids: list[int], prompt_len: int | None = None) -> torch.Tensor:
    """log-softmax over the vocabulary at every position of ``ids`` ([len(ids), vocab], float32).

    ``prompt_len``: positions from ``prompt_len`` on were decoded, not prefilled (it matters to a model
    with :class:`MlaPaths`)."""
    device = next(model.parameters()).device
    logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
    paths = mla_paths(model)
    if paths is not None and prompt_len is not None and prompt_len < len(ids):
        paths.decode = True
        try:
            decoded = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
        finally:
            paths.decode = False
        logits[prompt_len:] = decoded[prompt_len:]
    return torch.log_softmax(logits, dim=-1).cpu()


def generate_reference(
    plan, prompts: list[str] | list[list[int]], max_new_tokens: int, *, simulate_w8a8: bool = False, model=None
) -> list[ReferenceOutput]:
    """Greedy continuations of ``prompts`` (text, or token ids) with their logits, on CPU in fp32
    unless ``model`` is given."""
    model = model or build_reference_model(plan, simulate_w8a8=simulate_w8a8)
    tokenizer = load_tokenizer(plan)
    outputs = []
    for prompt in prompts:
        ids = list(prompt) if not isinstance(prompt, str) else tokenizer(prompt)["input_ids"]
        tokens, logits = greedy(model, ids, max_new_tokens)
        outputs.append(
            ReferenceOutput(ids, tokens, tokenizer.decode(tokens), logits, prompt if isinstance(prompt, str) else None)
        )
    return outputs


def plan_from_config(config_path: str | Path, tp_size: int = 1):
    from .core.config import load_config
    from .core.plan import build_plan

    return build_plan(load_config(config_path), tp_size=tp_size)


# ---- how close a bf16 implementation must come ----------------------------------------------------
class ReferencePair(NamedTuple):
    """One mix's reference in fp32 (the oracle) and in bf16 (how far bf16 arithmetic alone moves it)."""

    fp32: torch.nn.Module
    bf16: torch.nn.Module


def reference_pair(plan, device: str = "cpu") -> ReferencePair:
    """Both with fp8 activations quantized as SGLang's W8A8 kernels do."""
    return ReferencePair(
        *(
            build_reference_model(plan, dtype=dtype, device=device, simulate_w8a8=True)
            for dtype in (torch.float32, torch.bfloat16)
        )
    )


def logprob_deviation(pair: ReferencePair, sequences) -> tuple[float, float]:
    """(max |log-prob under test - fp32 reference|, max |bf16 reference - fp32 reference|).

    ``sequences``: (token ids, [(position in the ids that predicts the token, token, its log-prob
    under test)], optionally the prompt's length); every sequence is run teacher-forced through both
    references.
    """
    dev = noise = 0.0
    for ids, scored, *prompt_len in sequences:
        lp32 = teacher_forced_logprobs(pair.fp32, ids, *prompt_len)
        lp16 = teacher_forced_logprobs(pair.bf16, ids, *prompt_len)
        for pos, token, lp in scored:
            ref = float(lp32[pos, token])
            dev = max(dev, abs(lp - ref))
            noise = max(noise, abs(float(lp16[pos, token]) - ref))
    return dev, noise


def scored_continuation(prompt_ids: list[int], output_ids: list[int], output_logprobs: list[float]):
    """A sequence for :func:`logprob_deviation`: prompt and generated tokens, each generated token
    scored at the position that predicts it."""
    n = len(prompt_ids)
    scored = [(n - 1 + j, t, lp) for j, (t, lp) in enumerate(zip(output_ids, output_logprobs))]
    return prompt_ids + output_ids, scored, n


def logprob_tolerance(bf16_noise: float) -> float:
    """How far a bf16 implementation's log-probs may be from the fp32 reference.

    Its kernels sum in other orders, fuse norms/rotary and round fp8 activations near e4m3
    boundaries differently, each a deviation of the order of the reference's own bf16-vs-fp32
    distance: 3 x that distance, + 0.02 nats for the bf16 rounding of the log-probs themselves
    (|lp| up to ~8 nats * 2^-8).
    """
    return 3 * bf16_noise + 0.02
