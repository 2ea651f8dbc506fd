"""Calibrated GPTQ over a model, one decoder layer at a time.

Calibration text is tokenized with the model's tokenizer and cut into sequences; the last
sequences are held out to measure each layer's output error (GPTQ vs round-to-nearest). The
embeddings give layer 0's inputs; each decoder layer is rebuilt from the model's transformers
class with its 16-bit weights, its linears are quantized in the order data flows through them
(q/k/v, o, gate/up, down), each from the inputs produced by the already-quantized parts, and the
quantized layer's outputs become the next layer's inputs. Only one layer and the activations of
the calibration tokens are in memory.

MoE: the router (kept 16-bit) picks each token's top-k experts; every expert's Hessians come
from the tokens routed to it only. Experts with fewer than ``min_expert_tokens`` tokens fall back
to round-to-nearest and are reported.

Everything runs on the method's device (``--device``): the layer, the activations, the Hessians.
The experts of a layer are quantized in batches (all within EXPERT_BATCH_BYTES on a GPU, one at a
time on the CPU): same-shape GPTQ problems in one pass, the same bits as one at a time.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.architectures import transformers_name
from ..core.errors import ErrorCode, MixedPrecisionError
from ..core.formats.gptq import dequant as dequant_gptq
from ..core.naming import Role, classify
from .gptq import HessianAccumulator, gptq_quantize, gptq_quantize_batched
from .gptq_pack import GptqTensors, rtn_quantize

# Data-flow order of a decoder layer's linears: a stage's inputs depend on all earlier stages.
# DeepSeek-V3's MLA: q_a_proj and kv_a_proj_with_mqa read the hidden state, q_b_proj the normed q
# latent, kv_b_proj the normed kv latent (each its own input, so each its own stage), then o_proj.
STAGE_OF_LEAF = {
    "q_proj": 0,
    "k_proj": 0,
    "v_proj": 0,
    "q_a_proj": 0,
    "kv_a_proj_with_mqa": 0,
    "q_b_proj": 0.25,
    "kv_b_proj": 0.5,
    "o_proj": 1,
    "gate_proj": 2,
    "up_proj": 2,
    "w1": 2,
    "w3": 2,
    "down_proj": 3,
    "w2": 3,
}
# Mixtral's checkpoint names its experts' projections w1 (gate), w3 (up), w2 (down)
EXPERT_PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
FORWARD_BATCH = {"cpu": 8, "cuda": 64}  # sequences per forward call (bounds attention / MoE activations)
# Device memory for one batch of experts quantized together (Hessians, inverse factors, weights):
# ~150 MiB per Qwen3-30B-A3B expert gate/up, so 128 experts take two batches.
EXPERT_BATCH_BYTES = 16 * 2**30


# -- calibration tokens -------------------------------------------------------------------------
@dataclass
class CalibrationSet:
    calib: torch.Tensor  # [n, seqlen] token ids used for Hessians
    heldout: torch.Tensor  # [m, seqlen] token ids used only to measure error
    total_tokens: int
    note: str = ""


def calibration_text(calib_file: str | None) -> str:
    if calib_file is None:
        from ..testing.tinymodels import corpus_text

        return corpus_text()
    p = Path(calib_file)
    if not p.is_file():
        raise MixedPrecisionError(
            ErrorCode.CALIB_FILE_MISSING,
            "calibration file not found",
            where=str(p),
            fix="pass a UTF-8 text file to --calib_file, or omit it to use the bundled corpus",
        )
    return p.read_text(encoding="utf-8", errors="replace")


def split_windows(ids: torch.Tensor, nsamples: int, seqlen: int) -> CalibrationSet:
    """Non-overlapping windows; about 1 in 8 (at least one) held out at the end of the text."""
    total = ids.numel()
    note = ""
    if total < 2 * seqlen:
        seqlen = max(8, total // 4)
        note = f"text has only {total} tokens: sequences shortened to {seqlen}"
    windows = ids[: (total // seqlen) * seqlen].view(-1, seqlen)
    n_held = max(1, windows.shape[0] // 8)
    calib = windows[:-n_held][:nsamples]
    if calib.shape[0] < nsamples:
        note = (
            note + "; " if note else ""
        ) + f"text gives {calib.shape[0]} of the {nsamples} requested sequences of {seqlen} tokens"
    return CalibrationSet(calib, windows[-n_held:], total, note)


def calibration_set(model_path: Path, calib_file: str | None, nsamples: int, seqlen: int) -> CalibrationSet:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(model_path))
    except Exception as e:  # transformers raises many types for a missing / broken tokenizer
        raise MixedPrecisionError(
            ErrorCode.NO_TOKENIZER,
            f"cannot load the model's tokenizer: {e}",
            where=str(model_path),
            fix="add the tokenizer files to the model directory, or use --method rtn",
        ) from e
    text = calibration_text(calib_file)
    ids = torch.tensor(tok(text)["input_ids"], dtype=torch.long)
    if (
        ids.numel() == 0 and text.strip()
    ):  # transformers builds an empty tokenizer when the directory has no tokenizer files
        raise MixedPrecisionError(
            ErrorCode.NO_TOKENIZER,
            f"the model's tokenizer ({type(tok).__name__}, {len(tok)} token(s)) turns "
            "the calibration text into no tokens: the model directory has no usable tokenizer files",
            where=str(model_path),
            fix="add the tokenizer files to the model directory, or use --method rtn",
        )
    if ids.numel() < 64:
        raise MixedPrecisionError(
            ErrorCode.CALIB_TOO_SHORT,
            f"calibration text has only {ids.numel()} tokens",
            where=calib_file or "bundled corpus",
            fix="pass a longer --calib_file",
        )
    return split_windows(ids, nsamples, seqlen)


def split_rows(t: GptqTensors, rows: list[int]) -> list[GptqTensors]:
    """Split a GPTQ matrix quantized as one along its output rows (N; qzeros by N/8)."""
    qw = t.qweight.split(rows, dim=1)
    qz = t.qzeros.split([r // 8 for r in rows], dim=1)
    sc = t.scales.split(rows, dim=1)
    return [GptqTensors(a.contiguous(), b.contiguous(), c.contiguous(), t.g_idx.clone()) for a, b, c in zip(qw, qz, sc)]


def same_input_groups(modules: list[str]) -> list[list[str]]:
    """Modules of one stage that read the same tensor (q/k/v; gate/up of one MLP)."""
    groups: dict[str, list[str]] = {}
    for m in modules:
        groups.setdefault(m.rsplit(".", 1)[0], []).append(m)
    return list(groups.values())


# -- the transformers decoder layer ------------------------------------------------------------
class LayerFactory:
    """Builds a model's transformers decoder layer and rotary embedding from its config."""

    def __init__(self, model_path: Path, device: torch.device | str = "cpu"):
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        self.config = AutoConfig.from_pretrained(str(model_path))
        self.config._attn_implementation = "sdpa"  # causal attention without building a mask
        if hasattr(self.config, "_experts_implementation"):
            self.config._experts_implementation = "eager"  # the per-expert loop; no fused kernels on CPU
        module = sys.modules[MODEL_FOR_CAUSAL_LM_MAPPING[type(self.config)].__module__]
        self.layer_cls = self._find(module, "DecoderLayer")
        self.rotary = self._find(module, "RotaryEmbedding")(self.config).to(device)
        self.device = torch.device(device)

    @staticmethod
    def _find(module, suffix: str):
        hits = [
            v for k, v in vars(module).items() if k.endswith(suffix) and isinstance(v, type) and not k.startswith("_")
        ]
        if not hits:
            raise MixedPrecisionError(
                ErrorCode.UNSUPPORTED_ARCHITECTURE,
                f"{module.__name__} has no *{suffix} class",
                fix="use --method rtn for this architecture",
            )
        return hits[0]

    def position_embeddings(self, x: torch.Tensor):
        pos = torch.arange(x.shape[1], device=x.device).unsqueeze(0).expand(x.shape[0], -1)
        return self.rotary(x, pos)

    def build(self, layer_idx: int, tensors: dict[str, torch.Tensor], prefix: str) -> LayerWeights:
        with torch.device("meta"):
            layer = self.layer_cls(self.config, layer_idx=layer_idx)
        lw = LayerWeights(layer, prefix, self.config.model_type)
        lw.load(tensors, self.device)
        layer.eval()
        return lw


class LayerWeights:
    """Maps checkpoint tensors onto a transformers layer, including transformers' fused 3-D
    experts (``experts.gate_up_proj`` [E, 2I, H] = gate rows then up rows; ``experts.down_proj``)."""

    def __init__(self, layer: torch.nn.Module, prefix: str, model_type: str = ""):
        self.layer = layer
        self.prefix = prefix  # "model.layers.3."
        self.model_type = model_type

    def _rel(self, name: str) -> str:
        """A checkpoint name relative to the layer, as transformers names it in memory."""
        return transformers_name(self.model_type, name[len(self.prefix) :])

    def _fused_expert_target(self, rel_module: str):
        """(param, index) where an expert projection lives inside a fused 3-D parameter, or None."""
        parts = rel_module.split(".")  # mlp.experts.<e>.<proj>
        base, e, proj = ".".join(parts[:-2]), int(parts[-2]), parts[-1]
        try:
            experts = self.layer.get_submodule(base)
        except AttributeError:
            return None
        proj = EXPERT_PROJECTIONS.get(proj, proj)
        if proj in ("gate_proj", "up_proj") and hasattr(experts, "gate_up_proj"):
            p = experts.gate_up_proj
            half = p.shape[1] // 2
            rows = slice(0, half) if proj == "gate_proj" else slice(half, 2 * half)
            return p, (e, rows)
        if proj == "down_proj" and isinstance(getattr(experts, "down_proj", None), torch.nn.Parameter):
            return experts.down_proj, (e,)
        return None

    def load(self, tensors: dict[str, torch.Tensor], device: torch.device | str = "cpu") -> None:
        sd = {}
        expected = dict(self.layer.state_dict(keep_vars=True))
        fused: dict[str, torch.Tensor] = {}
        for name, t in tensors.items():
            rel = self._rel(name)
            if rel in expected:
                sd[rel] = t.to(device, torch.float32)
                continue
            module = rel.rsplit(".", 1)[0]
            target = self._fused_expert_target(module) if ".experts." in rel else None
            if target is None:
                raise MixedPrecisionError(
                    ErrorCode.UNSUPPORTED_ARCHITECTURE,
                    f"tensor {name} has no place in {type(self.layer).__name__}",
                    where=name,
                    fix="use --method rtn for this model",
                )
            param, idx = target
            key = next(k for k, v in expected.items() if v is param)
            buf = fused.setdefault(key, torch.zeros(param.shape, dtype=torch.float32, device=device))
            buf[idx] = t.to(device, torch.float32)
        sd.update(fused)
        missing = set(expected) - set(sd)
        if missing:
            raise MixedPrecisionError(
                ErrorCode.UNSUPPORTED_ARCHITECTURE,
                f"layer tensors missing from the checkpoint: {sorted(missing)[:5]}",
                where=self.prefix,
                fix="use --method rtn for this model",
            )
        self.layer.load_state_dict(sd, assign=True, strict=True)

    def set_weight(self, module: str, w: torch.Tensor) -> None:
        rel = self._rel(module)
        target = self._fused_expert_target(rel) if ".experts." in rel else None
        if target is not None:
            param, idx = target
            param.data[idx] = w.to(param.dtype)
        else:
            self.layer.get_submodule(rel).weight.data.copy_(w)

    def submodule(self, module: str) -> torch.nn.Module:
        return self.layer.get_submodule(self._rel(module))


# -- GPTQ over the model -----------------------------------------------------------------------
@dataclass
class ErrorTally:
    """Sum of squared output errors and of squared reference outputs on held-out inputs."""

    gptq: float = 0.0
    rtn: float = 0.0
    ref: float = 0.0

    def add(self, h: torch.Tensor, w: torch.Tensor, w_gptq: torch.Tensor, w_rtn: torch.Tensor) -> None:
        # ||X D^T||^2 = tr(D X^T X D^T) = sum((D @ H) * D) * n/2 with H = 2/n X^T X: common factor dropped
        def q(d):
            return float(((d @ h) * d).sum())

        self.gptq += q(w_gptq - w)
        self.rtn += q(w_rtn - w)
        self.ref += q(w)

    def merge(self, other: ErrorTally) -> None:
        self.gptq += other.gptq
        self.rtn += other.rtn
        self.ref += other.ref

    def relative(self) -> tuple[float, float]:
        r = max(self.ref, 1e-30)
        return (self.gptq / r) ** 0.5, (self.rtn / r) ** 0.5


@dataclass
class GptqStats:
    rtn_fallback: dict[str, int] = field(default_factory=dict)  # expert module -> tokens it got
    per_layer: dict[int, tuple[float, float]] = field(default_factory=dict)
    total: ErrorTally = field(default_factory=ErrorTally)
    expert_tokens: dict[str, int] = field(default_factory=dict)


class GptqInt4:
    """The int4 method of the pipeline: calibrated GPTQ, one layer at a time."""

    carries_activations = True  # a finished layer is replayed on resume: the next one needs its outputs

    def __init__(self, model, opts, log=print, device: torch.device | str = "cpu"):
        from transformers.activations import ACT2FN

        self.model, self.opts = model, opts
        self.device = torch.device(device)
        self.data = calibration_set(model.path, opts.calib_file, opts.nsamples, opts.seqlen)
        self.factory = LayerFactory(model.path, self.device)
        cfg = self.factory.config
        self.top_k = getattr(cfg, "num_experts_per_tok", None)
        self.act = ACT2FN[getattr(cfg, "hidden_act", "silu")]
        self.stats = GptqStats()
        # experts of one shape quantized in one batched pass: on by default on a GPU (opts.expert_batch:
        # 0 = automatic, 1 = one expert at a time as on the CPU, N = N experts per pass)
        self.opts_expert_batch = int(getattr(opts, "expert_batch", 0) or 0)
        self.batch_experts = self.opts_expert_batch > 1 or (self.opts_expert_batch == 0 and self.device.type == "cuda")
        self.hidden: torch.Tensor | None = None  # calibration activations entering the next layer
        self.hidden_ho: torch.Tensor | None = None
        log(
            f"gptq: {self.data.calib.shape[0]} calibration x {self.data.calib.shape[1]} tokens, "
            f"{self.data.heldout.shape[0]} held out ({self.data.total_tokens} tokens of text)"
            + (f"; {self.data.note}" if self.data.note else "")
        )

    # pipeline interface ------------------------------------------------------------------------
    def quantize_unit(self, unit, tensors: dict[str, torch.Tensor]) -> dict[str, GptqTensors]:
        if unit.layer is None:
            self._embed(tensors)
            return {}
        return self._layer(unit, tensors, written=None)

    def skip_unit(self, unit, tensors, written: dict[str, torch.Tensor]) -> None:
        """Resume: the layer is already written; replay it with the written weights to move on."""
        if unit.layer is None:
            self._embed(tensors)
        else:
            self._layer(unit, tensors, written=written)

    def report(self) -> dict:
        g, r = self.stats.total.relative()
        return {
            "method": "gptq",
            "calibration_sequences": int(self.data.calib.shape[0]),
            "seqlen": int(self.data.calib.shape[1]),
            "heldout_sequences": int(self.data.heldout.shape[0]),
            "calibration_note": self.data.note,
            "heldout_gptq_error": g,
            "heldout_rtn_error": r,
            "per_layer_heldout_error": {str(k): {"gptq": v[0], "rtn": v[1]} for k, v in self.stats.per_layer.items()},
            "rtn_fallback": self.stats.rtn_fallback,
            "expert_tokens": self.stats.expert_tokens,
        }

    # steps -------------------------------------------------------------------------------------
    def _embed(self, tensors: dict[str, torch.Tensor]) -> None:
        emb = [t for n, t in tensors.items() if classify(n.rsplit(".", 1)[0]).role is Role.EMBEDDING]
        if not emb:
            raise MixedPrecisionError(
                ErrorCode.UNSUPPORTED_ARCHITECTURE,
                "no token embedding found outside the layers",
                where=str(self.model.path),
                fix="use --method rtn for this model",
            )
        table = emb[0].to(self.device, torch.float32)
        self.hidden = table[self.data.calib.to(self.device)]
        self.hidden_ho = table[self.data.heldout.to(self.device)]

    def _forward(self, lw: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        outs = []
        step = FORWARD_BATCH.get(self.device.type, FORWARD_BATCH["cpu"])
        with torch.no_grad():
            for i in range(0, x.shape[0], step):
                xb = x[i : i + step]
                out = lw.layer(xb, attention_mask=None, position_embeddings=self.factory.position_embeddings(xb))
                outs.append(out[0] if isinstance(out, tuple) else out)
        return torch.cat(outs)

    def _capture(self, lw: LayerWeights, inputs: list[list[str]], moe_block: str | None):
        """Run calibration and held-out tokens through the layer; return one (calib, held-out)
        Hessian pair per list of modules that read the same input, and the MoE block's inputs."""
        hess = []
        moe_in: dict[int, list[torch.Tensor]] = {0: [], 1: []}
        phase = [0]
        hooks = []
        for group in inputs:
            k = lw.submodule(group[0]).in_features
            pair = (HessianAccumulator(k, self.device), HessianAccumulator(k, self.device))
            hess.append(pair)
            hooks.append(
                lw.submodule(group[0]).register_forward_pre_hook(
                    lambda mod, args, pair=pair: pair[phase[0]].add(args[0])
                )
            )
        if moe_block is not None:
            hooks.append(
                lw.submodule(moe_block).register_forward_pre_hook(
                    lambda mod, args: moe_in[phase[0]].append(args[0].reshape(-1, args[0].shape[-1]))
                )
            )
        try:
            self._forward(lw, self.hidden)
            phase[0] = 1
            self._forward(lw, self.hidden_ho)
        finally:
            for h in hooks:
                h.remove()
        moe = (torch.cat(moe_in[0]), torch.cat(moe_in[1])) if moe_block is not None else None
        return hess, moe

    def _quantize(
        self,
        modules: list[str],
        tensors: dict[str, torch.Tensor],
        h: HessianAccumulator,
        h_ho: HessianAccumulator,
        tally: ErrorTally,
        lw: LayerWeights,
    ) -> dict[str, GptqTensors]:
        return self._quantize_groups([modules], tensors, [(h, h_ho)], tally, lw)

    def _weight(self, tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
        return tensors[f"{module}.weight"].to(self.device, torch.float32)

    def _quantize_groups(
        self,
        groups: list[list[str]],
        tensors: dict[str, torch.Tensor],
        hess: list[tuple[HessianAccumulator, HessianAccumulator]],
        tally: ErrorTally,
        lw: LayerWeights,
    ) -> dict[str, GptqTensors]:
        """GPTQ for groups of modules, each group reading one input (one Hessian pair): GPTQ treats
        output rows independently, so a group is quantized as one matrix and split back. Groups
        with too few tokens fall back to RTN. Writes the dequantized weights into the layer so
        later stages see the quantized model."""
        out: dict[str, GptqTensors] = {}
        jobs = []  # (modules, weights, RTN-dequantized weights, held-out Hessian)
        for modules, (h, h_ho) in zip(groups, hess):
            ws = [self._weight(tensors, m) for m in modules]
            rtn = [rtn_quantize(w, self.opts.group_size) for w in ws]
            w_rtn = [dequant_gptq(*r.parts()) for r in rtn]
            if h.n < self.opts.min_expert_tokens:
                for m, d in zip(modules, w_rtn):
                    self.stats.rtn_fallback[m] = h.n
                    lw.set_weight(m, d)
                out.update(zip(modules, rtn))
                continue
            jobs.append((modules, ws, w_rtn, h_ho, h.hessian))
        results = self._gptq([torch.cat(j[1]) for j in jobs], [j[4] for j in jobs])
        for (modules, ws, w_rtn, h_ho, _), (packed, deq) in zip(jobs, results):
            rows = [w.shape[0] for w in ws]
            for m, w, d, dr in zip(modules, ws, deq.split(rows), w_rtn):
                lw.set_weight(m, d)
                if h_ho.n:
                    tally.add(h_ho.hessian, w, d, dr)
            out.update(zip(modules, split_rows(packed, rows)))
        return out

    def _gptq(self, weights: list[torch.Tensor], hessians: list[torch.Tensor]):
        """(packed, dequantized) per matrix: one batched pass when there are several of one shape
        (the experts of a layer) and batching is on, else one matrix at a time."""
        kw = dict(group_size=self.opts.group_size, damp_percent=self.opts.damp_percent, act_order=self.opts.desc_act)
        if len(weights) > 1 and self.batch_experts and len({w.shape for w in weights}) == 1:
            batch = gptq_quantize_batched(torch.stack(weights), torch.stack(hessians), **kw)
            return list(zip(batch.tensors, batch.dequantized.unbind(0)))
        results = [gptq_quantize(w, h, **kw) for w, h in zip(weights, hessians)]
        return [(r.tensors, r.dequantized) for r in results]

    def _layer(self, unit, tensors, written: dict[str, torch.Tensor] | None) -> dict[str, GptqTensors]:
        prefix = f"{unit.tensors[0].split('.layers.')[0]}.layers.{unit.layer}."
        lw = self.factory.build(unit.layer, tensors, prefix)
        out: dict[str, GptqTensors] = {}
        tally = ErrorTally()
        if written is not None:
            for m, w in written.items():
                lw.set_weight(m, w)
        else:
            for _stage, modules in self._stages(unit.quantized_modules):
                plain = [m for m in modules if classify(m).role is not Role.ROUTED_EXPERT]
                experts = [m for m in modules if classify(m).role is Role.ROUTED_EXPERT]
                moe_block = self._moe_block(experts) if experts else None
                inputs = same_input_groups(plain)
                hess, moe = self._capture(lw, inputs, moe_block)
                for group, (h, h_ho) in zip(inputs, hess):
                    out.update(self._quantize(group, tensors, h, h_ho, tally, lw))
                if experts:
                    out.update(self._experts(lw, unit, tensors, moe, tally, moe_block))
        self.hidden = self._forward(lw, self.hidden)
        self.hidden_ho = self._forward(lw, self.hidden_ho)
        if written is None:
            self.stats.per_layer[unit.layer] = tally.relative()
            self.stats.total.merge(tally)
        return out

    @staticmethod
    def _stages(modules: list[str]) -> list[tuple[int, list[str]]]:
        stages: dict[int, list[str]] = {}
        for m in modules:
            leaf = m.rsplit(".", 1)[-1]
            if leaf not in STAGE_OF_LEAF:
                raise MixedPrecisionError(
                    ErrorCode.UNSUPPORTED_ARCHITECTURE,
                    f"no calibration order known for {m}",
                    where=m,
                    fix="use --method rtn, or --skip this module",
                )
            stages.setdefault(STAGE_OF_LEAF[leaf], []).append(m)
        # experts' down projections are handled with their gate/up from the same routed tokens
        if 2 in stages and 3 in stages:
            moved = [m for m in stages[3] if classify(m).role is Role.ROUTED_EXPERT]
            stages[2] += moved
            stages[3] = [m for m in stages[3] if m not in moved]
        return sorted((k, v) for k, v in stages.items() if v)

    @staticmethod
    def _moe_block(experts: list[str]) -> str:
        base = classify(experts[0]).group  # model.layers.3.mlp.experts
        return base.rsplit(".", 1)[0]  # model.layers.3.mlp

    def _router_weight(self, tensors, moe_block: str) -> torch.Tensor:
        for n, t in tensors.items():
            ref = classify(n.rsplit(".", 1)[0])
            if (
                ref.role is Role.ROUTER
                and n.startswith(moe_block + ".")
                and n.endswith(".weight")
                and "shared" not in n
            ):
                return t.float()
        raise MixedPrecisionError(
            ErrorCode.UNSUPPORTED_ARCHITECTURE,
            f"no router weight found in {moe_block}",
            where=moe_block,
            fix="use --method rtn for this model",
        )

    def route(self, x: torch.Tensor, router_w: torch.Tensor) -> torch.Tensor:
        """Top-k expert indices per token [T, k] (softmax is monotonic, so top-k of the logits)."""
        return torch.topk(x @ router_w.t(), self.top_k, dim=-1).indices

    def _selected_experts(self, lw, moe_block: str, x: torch.Tensor, router_w: torch.Tensor) -> torch.Tensor:
        """Top-k experts per token [T, k], as the model routes them."""
        block = lw.submodule(moe_block)
        if hasattr(block, "route_tokens_to_experts"):  # DeepSeek-V3: sigmoid + e_score_correction_bias, by group
            with torch.no_grad():
                return block.route_tokens_to_experts(block.gate(x))[0]
        return self.route(x, router_w)

    def _experts(self, lw, unit, tensors, moe, tally, moe_block) -> dict[str, GptqTensors]:
        x, x_ho = moe
        router_w = self._router_weight(tensors, moe_block).to(self.device)
        sel, sel_ho = (self._selected_experts(lw, moe_block, t, router_w) for t in (x, x_ho))
        by_expert: dict[int, dict[str, str]] = {}
        for m in unit.quantized_modules:
            ref = classify(m)
            if ref.role is Role.ROUTED_EXPERT:
                by_expert.setdefault(ref.expert, {})[ref.shard] = m
        experts = sorted(by_expert.items())
        step = self._expert_chunk_size(experts, tensors, x.shape[0] * (self.top_k or 1))
        out = {}
        for i in range(0, len(experts), step):
            routed = [
                (projs, x[(sel == e).any(dim=-1)], x_ho[(sel_ho == e).any(dim=-1)])
                for e, projs in experts[i : i + step]
            ]
            out.update(self._expert_chunk(routed, tensors, tally, lw))
        return out

    def _expert_chunk_size(self, experts, tensors, routed_tokens: int) -> int:
        """Experts quantized together: all of a layer's within EXPERT_BATCH_BYTES on a GPU (a launch
        per column for the whole batch), one at a time on the CPU (today's memory bound there)."""
        if not self.batch_experts or not experts:
            return 1
        if self.opts_expert_batch:
            return self.opts_expert_batch
        n, k = tensors[f"{experts[0][1]['w1']}.weight"].shape if "w1" in experts[0][1] else (1, 1)
        n *= 2  # gate and up quantized as one matrix
        tokens = routed_tokens // max(1, len(experts))
        per_expert = 4 * (5 * k * k + 6 * n * k + 2 * tokens * k)  # float32 Hessians, factors, weights, inputs
        most = max(1, min(len(experts), EXPERT_BATCH_BYTES // per_expert))
        chunks = -(-len(experts) // most)
        return -(-len(experts) // chunks)  # even chunks

    @staticmethod
    def _hessians(x: torch.Tensor, x_ho: torch.Tensor) -> tuple[HessianAccumulator, HessianAccumulator]:
        h, h_ho = HessianAccumulator(x.shape[1], x.device), HessianAccumulator(x.shape[1], x.device)
        h.add(x)
        h_ho.add(x_ho)
        return h, h_ho

    def _expert_chunk(self, routed, tensors, tally, lw) -> dict[str, GptqTensors]:
        """gate/up of every expert of the chunk (each from its own routed tokens), then down from
        act(gate) * up computed with the quantized gate/up."""
        for projs, xe, _ in routed:
            for m in projs.values():
                self.stats.expert_tokens[m] = int(xe.shape[0])
        gate_up = [[projs[s] for s in ("w1", "w3") if s in projs] for projs, _, _ in routed]
        out = self._quantize_groups(gate_up, tensors, [self._hessians(xe, xe_ho) for _, xe, xe_ho in routed], tally, lw)
        downs, hess = [], []
        for projs, xe, xe_ho in routed:
            if "w2" not in projs:
                continue
            g, u = (dequant_gptq(*out[projs[s]].parts()) for s in ("w1", "w3"))
            hess.append(self._hessians(self.act(xe @ g.t()) * (xe @ u.t()), self.act(xe_ho @ g.t()) * (xe_ho @ u.t())))
            downs.append([projs["w2"]])
        out.update(self._quantize_groups(downs, tensors, hess, tally, lw))
        return out
