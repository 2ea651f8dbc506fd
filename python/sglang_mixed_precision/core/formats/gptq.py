"""GPTQ v1 linears (``qweight`` / ``qzeros`` / ``scales`` / ``g_idx``), run by SGLang's gptq_marlin
kernels on CUDA: symmetric, 4 or 8 bits, group size -1 / 32 / 64 / 128. Read from ``quant_method:
gptq`` (or older exports' ``quantize_config.json``); written as GPTQModel writes it."""

from __future__ import annotations

import re
from typing import Any

from ..errors import ErrorCode, MixedPrecisionError
from . import FLOAT_DTYPES, Format, Scheme, TensorSpec

MARLIN_BITS = (4, 8)
MARLIN_GROUP_SIZES = (-1, 32, 64, 128)
MARLIN_MIN_THREAD_N = 64
MARLIN_MIN_THREAD_K = 128
RELEASE_GROUP_SIZE = 128
_SCALE_DTYPES = ("F16", "BF16")


def _unsupported(reason: str, where: str) -> MixedPrecisionError:
    return MixedPrecisionError(
        ErrorCode.UNSUPPORTED_SCHEME,
        f"GPTQ checkpoint: {reason}; SGLang runs GPTQ on CUDA only through gptq_marlin",
        where=where,
        fix="use a symmetric GPTQ export with bits 4 or 8 and group_size -1, 32, 64 or 128 "
        "(e.g. `sglang-mp convert --int4` from the 16-bit model)",
    )


def _marlin_problems(scheme: Scheme, what: str, n: int, k: int, k_full: int) -> list[str]:
    """SGLang's ``verify_marlin_supports_shape`` for one per-rank [N, K]."""
    problems = []
    if n % MARLIN_MIN_THREAD_N:
        problems.append(f"{what}: per-rank N {n} is not divisible by {MARLIN_MIN_THREAD_N} (gptq_marlin min_thread_n)")
    if k % MARLIN_MIN_THREAD_K:
        problems.append(f"{what}: per-rank K {k} is not divisible by {MARLIN_MIN_THREAD_K} (gptq_marlin min_thread_k)")
    group = scheme.group_size
    if group != -1 and group < k_full and k % group:
        problems.append(f"{what}: per-rank K {k} is not divisible by group_size {group}")
    return problems


class Gptq(Format):
    kind = "gptq"
    quant_methods = ("gptq", "gptq_marlin")
    precision_names = ("int4",)
    side_config_files = ("quantize_config.json",)
    release_dense_dtype = "F16"  # GPTQ releases keep their unquantized tensors in fp16
    release_optional = frozenset({"g_idx"})

    # -- config.json
    def parse(self, qc: dict, dtype: str, where: str) -> Scheme:
        missing = [k for k in ("bits", "group_size") if k not in qc]
        if missing:
            raise _unsupported(f"quantization_config lacks {', '.join(missing)}", where)
        bits, group, sym = qc["bits"], qc["group_size"], qc.get("sym", True)
        desc_act = bool(qc.get("desc_act", False))
        fmt = str(qc.get("checkpoint_format") or "gptq")
        if fmt not in ("gptq", ""):
            raise _unsupported(
                f"checkpoint_format {fmt!r} (only the GPTQ v1 layout qweight/qzeros/scales/g_idx is read)", where
            )
        if bits not in MARLIN_BITS:
            raise _unsupported(f"bits={bits!r} (gptq_marlin runs 4 or 8 bits)", where)
        if group not in MARLIN_GROUP_SIZES:
            raise _unsupported(f"group_size={group!r} (gptq_marlin runs group sizes {list(MARLIN_GROUP_SIZES)})", where)
        if sym is not True:
            raise _unsupported(
                f"asymmetric quantization (sym={sym!r}); gptq_marlin has no zero-point GPTQ kernel", where
            )
        return Scheme(self.kind, dtype=dtype, bits=bits, group_size=group, sym=True, desc_act=desc_act)

    def quantization_config(
        self, scheme: Scheme, *, skipped_groups=(), damp_percent=None, quantizer=None, **_: Any
    ) -> dict:
        """GPTQ v1 fields as GPTQModel writes them; SGLang reads bits, group_size, desc_act, sym, lm_head,
        dynamic and checkpoint_format. ``dynamic`` "-:" rules keep ``skipped_groups`` 16-bit."""
        qc = {
            "quant_method": "gptq",
            "bits": scheme.bits,
            "group_size": scheme.group_size,
            "sym": scheme.sym,
            "desc_act": bool(scheme.desc_act),
            "checkpoint_format": "gptq",
        }
        if damp_percent is not None:  # written by the converter: how the checkpoint was made
            qc.update(damp_percent=damp_percent, static_groups=False, true_sequential=True, lm_head=False)
            qc["dynamic"] = {f"-:{re.escape(g)}$": {} for g in skipped_groups}
            qc["quantizer"] = [quantizer or "sglang-mixed-precision"]
        return qc

    def release_scheme(self, dtype: str) -> Scheme:
        return Scheme(self.kind, dtype=dtype, bits=4, group_size=RELEASE_GROUP_SIZE, sym=True, desc_act=False)

    # -- what a module stores
    def label(self, scheme: Scheme) -> str:
        group = "gall" if scheme.group_size == -1 else f"g{scheme.group_size}"
        return f"gptq-int{scheme.bits}-{group}" + ("" if scheme.sym else "-asym") + ("-act" if scheme.desc_act else "")

    def expected_tensors(self, scheme: Scheme, n: int, k: int) -> dict[str, TensorSpec]:
        pack = 32 // scheme.bits
        groups = 1 if scheme.group_size == -1 else -(-k // scheme.group_size)
        return {
            "qweight": TensorSpec(("I32",), (k // pack, n)),
            "qzeros": TensorSpec(("I32",), (groups, n // pack)),
            "scales": TensorSpec(_SCALE_DTYPES, (groups, n)),
            "g_idx": TensorSpec(("I32",), (k,), optional=True),
            "bias": TensorSpec(FLOAT_DTYPES, (n,), optional=True),
        }

    def stores_quantized(self, entries: dict[str, dict]) -> bool:
        return "qweight" in entries

    def precision_name(self, scheme: Scheme) -> str:
        return f"int{scheme.bits}"

    def logical_shape(self, scheme: Scheme, shapes: dict[str, tuple]) -> tuple[int, ...] | None:
        if "qweight" not in shapes:
            return super().logical_shape(scheme, shapes)
        k_packed, n = shapes["qweight"]
        return (n, k_packed * (32 // scheme.bits))

    # -- serving
    def rank_problems(self, scheme: Scheme, rs) -> list[str]:
        """Dense layers run GPTQ-Marlin; experts run if any int4 MoE kernel can (the server picks one)."""
        if not rs.moe:
            return _marlin_problems(scheme, "weight", rs.n, rs.k, rs.k_full)
        per_kernel = {name: rule(scheme, rs) for name, rule in MOE_KERNEL_RULES.items()}
        if any(not problems for problems in per_kernel.values()):
            return []
        return [f"no int4 MoE kernel runs these experts ({name}: {'; '.join(p)})" for name, p in per_kernel.items()]

    def in_place_refusal(self, scheme: Scheme, moe: bool) -> str | None:
        return (
            "GPTQ-Marlin repacks qweight/scales into its own layout after loading (gptq_marlin_repack, "
            "permuted scales, g_idx sort), so checkpoint bytes cannot be copied into the running layer"
        )

    # -- tensor data
    def dequantize(self, scheme: Scheme, tensors: dict) -> dict:
        out = {k: v for k, v in tensors.items() if k == "bias"}
        g_idx = tensors.get("g_idx") if scheme.desc_act else None
        out["weight"] = dequant(tensors["qweight"], tensors["qzeros"], tensors["scales"], g_idx, bits=scheme.bits)
        return out


# ---- int4 MoE kernels: what each SGLang kernel can run, per rank ----------------------------------
def marlin_moe_problems(scheme: Scheme, rs) -> list[str]:
    """GPTQ-Marlin MoE (SGLang's ``check_moe_marlin_supports_layer``): gate/up (N = 2I, K = H) and
    down (N = H, K = I) need H % 128 and I % max(64, group) per rank."""
    problems = []
    if rs.k % 128:
        problems.append(f"hidden size {rs.k} is not divisible by 128")
    step = max(64, scheme.group_size if scheme.group_size and scheme.group_size > 0 else 64)
    if rs.moe_intermediate % step:
        problems.append(f"per-rank MoE intermediate {rs.moe_intermediate} is not divisible by {step}")
    return problems


def wna16_moe_problems(scheme: Scheme, rs) -> list[str]:
    """SGLang's Triton W4A16 MoE method: it ignores g_idx, so act-order experts would compute wrong values."""
    problems = []
    if scheme.desc_act:
        problems.append("act-order (desc_act) experts: the method ignores g_idx")
    if scheme.bits != 4:
        problems.append(f"{scheme.bits}-bit experts (the method's kernel is 4-bit)")
    return problems


# kernel name -> its shape / feature rules; the server picks the first that runs (serving/methods.py)
MOE_KERNEL_RULES = {"marlin": marlin_moe_problems, "wna16": wna16_moe_problems}


# ---- the GPTQ v1 layout, written from its description (not from the converter's packer) ----------
def _fields(words, bits: int):
    """int32 words [R, C] -> [R, 32/bits, C] unsigned fields, lowest field first."""
    import torch

    u = words.to(torch.int64) % (1 << 32)  # reinterpret the int32 bits as unsigned
    per_word = 32 // bits
    return torch.stack([(u // (1 << (bits * i))) % (1 << bits) for i in range(per_word)], dim=1)


def unpack_int(qweight, bits: int = 4):
    """qweight int32 [K*bits/32, N] -> integer weights [K, N]."""
    return _fields(qweight, bits).reshape(-1, qweight.shape[1])


def unpack_zeros(qzeros, bits: int = 4):
    """qzeros int32 [G, N*bits/32] -> true zero points [G, N] (GPTQ v1 stores zero - 1)."""
    f = _fields(qzeros, bits)  # [G, 8, N/8]: field i of word j is column j*8 + i
    return f.permute(0, 2, 1).reshape(qzeros.shape[0], -1) + 1


def dequant(qweight, qzeros, scales, g_idx=None, bits: int = 4):
    """GPTQ v1 tensors -> float32 weight [N, K] (nn.Linear layout)."""
    import torch

    q = unpack_int(qweight, bits)  # [K, N]
    zeros = unpack_zeros(qzeros, bits)  # [G, N]
    k = q.shape[0]
    if g_idx is None:
        g_idx = torch.arange(k, device=qweight.device) // (k // scales.shape[0])
    g = g_idx.long()
    return ((q - zeros[g]).float() * scales.float()[g]).t().contiguous()


FORMAT = Gptq()
