"""Checkpoint tensor names -> modules, roles and the groups SGLang fuses them into.

The unit of a mapping is the *module* (``model.layers.0.self_attn.q_proj``); a checkpoint stores
several tensors per module (``weight``; ``weight_scale_inv``; ``qweight``/``qzeros``/``scales``/
``g_idx``; ``bias``). SGLang builds one layer for several checkpoint modules: q/k/v become
``qkv_proj``, gate/up become ``gate_up_proj`` and every projection of every expert of one layer
becomes one ``FusedMoE`` at ``...mlp.experts``. All members of such a group must share a scheme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

# Tensor suffixes a module may carry, across the formats the project reads.
TENSOR_SUFFIXES = (
    "weight_scale_inv",
    "weight_scale",
    "input_scale",
    "qweight",
    "qzeros",
    "scales",
    "g_idx",
    "weight",
    "bias",
    "e_score_correction_bias",  # DeepSeek-V3's router (mlp.gate)
)


class Role(str, Enum):
    ATTENTION = "attention"
    DENSE_MLP = "dense_mlp"
    SHARED_EXPERT = "shared_expert"
    ROUTED_EXPERT = "routed_expert"
    ROUTER = "router"
    NORM = "norm"
    EMBEDDING = "embedding"
    LM_HEAD = "lm_head"
    OTHER = "other"

    @property
    def quantizable(self) -> bool:
        """Roles whose modules are linears SGLang can run in fp8 / int4."""
        return self in (Role.ATTENTION, Role.DENSE_MLP, Role.SHARED_EXPERT, Role.ROUTED_EXPERT)


@dataclass(frozen=True)
class ModuleRef:
    name: str  # checkpoint module name, e.g. model.layers.3.mlp.experts.7.gate_proj
    role: Role
    layer: int | None  # decoder layer index, None outside the decoder stack
    group: str  # SGLang layer prefix this module is built into (itself if not fused)
    shard: str | None = None  # q/k/v, gate/up, down, o ... inside the group
    expert: int | None = None  # routed expert index


_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_EXPERT_RE = re.compile(r"^(?P<base>.*\.experts)\.(?P<idx>\d+)\.(?P<proj>[A-Za-z0-9_]+)$")

# checkpoint leaf -> (SGLang fused leaf, shard id)
_FUSED_LEAVES = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"),
    "up_proj": ("gate_up_proj", "up"),
    # DeepSeek-V3's MLA: SGLang's load_weights concatenates these two (when q_lora_rank is set)
    "q_a_proj": ("fused_qkv_a_proj_with_mqa", "q_a"),
    "kv_a_proj_with_mqa": ("fused_qkv_a_proj_with_mqa", "kv_a"),
}
# routed expert projection -> FusedMoE weight (w1 = gate, w3 = up, w2 = down)
_EXPERT_SHARDS = {"gate_proj": "w1", "w1": "w1", "up_proj": "w3", "w3": "w3", "down_proj": "w2", "w2": "w2"}
# Router names of the MoE architectures we know (Qwen2/3-MoE ``mlp.gate``; Mixtral ``block_sparse_moe.gate``).
_ROUTER_LEAVES = ("gate", "router")
_SHARED_EXPERT_PARENTS = ("shared_expert", "shared_experts")
_ATTENTION_PARENTS = ("self_attn", "attention", "attn")


def split_tensor_name(tensor_name: str) -> tuple[str, str]:
    """``model.layers.0.mlp.down_proj.qweight`` -> (``model.layers.0.mlp.down_proj``, ``qweight``).

    A name without a known suffix is taken as a module name with an empty suffix.
    """
    module, _, leaf = tensor_name.rpartition(".")
    if module and leaf in TENSOR_SUFFIXES:
        return module, leaf
    return tensor_name, ""


def module_name(name: str) -> str:
    """Strip a tensor suffix if there is one: mappings may name modules or tensors."""
    return split_tensor_name(name)[0]


def layer_index(name: str) -> int | None:
    m = _LAYER_RE.search(name)
    return int(m.group(1)) if m else None


def classify(module: str) -> ModuleRef:
    """Role and fused group of a checkpoint module name (no tensor suffix)."""
    layer = layer_index(module)
    parts = module.split(".")
    leaf = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""

    m = _EXPERT_RE.match(module)
    if m:
        proj = m.group("proj")
        shard = _EXPERT_SHARDS.get(proj, proj)
        return ModuleRef(module, Role.ROUTED_EXPERT, layer, m.group("base"), shard, int(m.group("idx")))

    if "embed_tokens" in leaf or leaf in ("wte", "word_embeddings"):
        return ModuleRef(module, Role.EMBEDDING, layer, module)
    if leaf in ("lm_head", "output") and layer is None:
        return ModuleRef(module, Role.LM_HEAD, layer, module)
    if "norm" in leaf or leaf.startswith("ln_"):
        return ModuleRef(module, Role.NORM, layer, module)
    if layer is not None and leaf in _ROUTER_LEAVES and parent in ("mlp", "block_sparse_moe", "moe"):
        return ModuleRef(module, Role.ROUTER, layer, module)
    if leaf == "shared_expert_gate":
        return ModuleRef(module, Role.ROUTER, layer, module)

    role = Role.OTHER
    if parent in _ATTENTION_PARENTS:
        role = Role.ATTENTION
    elif parent in _SHARED_EXPERT_PARENTS:
        role = Role.SHARED_EXPERT
    elif parent == "mlp":
        role = Role.DENSE_MLP

    if leaf in _FUSED_LEAVES and role is not Role.OTHER:
        fused, shard = _FUSED_LEAVES[leaf]
        return ModuleRef(module, role, layer, ".".join(parts[:-1] + [fused]), shard)
    return ModuleRef(module, role, layer, module, leaf if role is not Role.OTHER else None)
